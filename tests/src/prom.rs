//! Real Prometheus tooling for the observability tests: `promtool` (check and
//! unit-test rules, lint expositions) and a throwaway `prometheus` server
//! (Debian package `prometheus`) with its own config, storage dir and port.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The repository's `dashboards/` directory.
pub fn dashboards_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../dashboards")
}

/// What a finished `promtool` run produced.
#[derive(Debug)]
pub struct ToolOutput {
    pub success: bool,
    pub text: String,
}

/// Runs `promtool ARGS`, feeding `stdin`.
pub fn promtool(args: &[&str], stdin: &[u8]) -> ToolOutput {
    let mut child = Command::new("promtool")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("promtool: {e} (Debian package prometheus is required)"));
    if let Some(mut si) = child.stdin.take() {
        let _ = si.write_all(stdin);
    }
    let out = child
        .wait_with_output()
        .unwrap_or_else(|e| panic!("wait promtool: {e}"));
    ToolOutput {
        success: out.status.success(),
        text: format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    }
}

/// Every distinct `warden_*` metric name mentioned in `text` (PromQL or YAML).
pub fn warden_metric_names(text: &str) -> Vec<String> {
    let mut names: Vec<String> = Vec::new();
    let bytes = text.as_bytes();
    let mut i = 0;
    while let Some(off) = text[i..].find("warden_") {
        let start = i + off;
        let boundary = start == 0 || {
            let c = bytes[start - 1];
            !(c.is_ascii_alphanumeric() || c == b'_' || c == b':')
        };
        let mut end = start;
        while end < bytes.len() && (bytes[end].is_ascii_alphanumeric() || bytes[end] == b'_') {
            end += 1;
        }
        if boundary && end > start + "warden_".len() {
            let n = text[start..end].to_string();
            if !names.contains(&n) {
                names.push(n);
            }
        }
        i = end.max(start + 1);
    }
    names
}

/// Sample names present in a text exposition.
pub fn exposed_names(exposition: &str) -> Vec<String> {
    let mut names: Vec<String> = Vec::new();
    for line in exposition.lines().filter(|l| !l.starts_with('#')) {
        let end = line.find(['{', ' ']).unwrap_or(line.len());
        let n = &line[..end];
        if !n.is_empty() && !names.iter().any(|x| x == n) {
            names.push(n.to_string());
        }
    }
    names
}

/// Value of the first sample whose line starts with `series` (name and labels
/// exactly as warden prints them), e.g. `warden_secrets` or
/// `warden_sessions_total{route="a",workload="b",result="allowed"}`.
pub fn sample(exposition: &str, series: &str) -> Option<f64> {
    exposition.lines().find_map(|l| {
        let rest = l.strip_prefix(series)?;
        rest.strip_prefix(' ')?.trim().parse().ok()
    })
}

/// A throwaway Prometheus server; killed and its storage removed on drop.
pub struct PromServer {
    child: Child,
    pub dir: tempfile::TempDir,
    pub port: u16,
}

impl PromServer {
    /// Starts `prometheus` scraping `targets` (host:port) every second as job
    /// `warden`, evaluating `rule_files` every second, and waits until it is ready.
    pub fn start(targets: &[String], rule_files: &[PathBuf]) -> PromServer {
        let dir = tempfile::Builder::new()
            .prefix("warden-prom-")
            .tempdir()
            .unwrap_or_else(|e| panic!("tempdir: {e}"));
        let port = crate::free_port();
        let quoted = |v: Vec<String>| v.join(", ");
        let config = format!(
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\n\
             rule_files: [{rules}]\n\
             scrape_configs:\n  - job_name: warden\n    static_configs:\n      - targets: [{targets}]\n",
            rules = quoted(
                rule_files
                    .iter()
                    .map(|p| format!("\"{}\"", p.display()))
                    .collect()
            ),
            targets = quoted(targets.iter().map(|t| format!("\"{t}\"")).collect()),
        );
        let cfg_path = dir.path().join("prometheus.yml");
        std::fs::write(&cfg_path, config).unwrap_or_else(|e| panic!("write config: {e}"));
        let log = std::fs::File::create(dir.path().join("prometheus.log"))
            .unwrap_or_else(|e| panic!("log: {e}"));
        let bin = ["/usr/bin/prometheus", "prometheus"]
            .into_iter()
            .find(|b| !b.starts_with('/') || Path::new(b).exists())
            .unwrap_or("prometheus");
        let child = Command::new(bin)
            .arg(format!("--config.file={}", cfg_path.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap_or_else(|e| panic!("log: {e}")))
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("{bin}: {e} (Debian package prometheus is required)"));
        let mut s = PromServer { child, dir, port };
        s.wait_for("server ready", |s| s.get("/-/ready").0 == 200);
        s
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("prometheus.log")).unwrap_or_default()
    }

    /// GET `path` on the server: (status, body).
    pub fn get(&self, path: &str) -> (u16, String) {
        self.curl(&[&format!("http://127.0.0.1:{}{path}", self.port)])
    }

    /// Instant query through the HTTP API; returns the JSON answer.
    pub fn query(&self, promql: &str) -> serde_json::Value {
        let (code, body) = self.curl(&[
            "-G",
            &format!("http://127.0.0.1:{}/api/v1/query", self.port),
            "--data-urlencode",
            &format!("query={promql}"),
        ]);
        serde_json::from_str(&body)
            .unwrap_or_else(|e| panic!("query {promql:?}: HTTP {code}, not JSON ({e}): {body}"))
    }

    fn curl(&self, args: &[&str]) -> (u16, String) {
        let out = Command::new("curl")
            .args(["-s", "-o", "-", "-w", "\n%{http_code}", "--max-time", "10"])
            .args(args)
            .output()
            .unwrap_or_else(|e| panic!("curl: {e} (is curl installed?)"));
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let (body, code) = text.rsplit_once('\n').unwrap_or(("", "0"));
        (code.trim().parse().unwrap_or(0), body.to_string())
    }

    /// Polls `cond` (generously: the machine is shared) until it holds.
    pub fn wait_for(&mut self, what: &str, mut cond: impl FnMut(&PromServer) -> bool) {
        let deadline = Instant::now() + Duration::from_secs(90);
        loop {
            if cond(self) {
                return;
            }
            if let Ok(Some(st)) = self.child.try_wait() {
                panic!("prometheus exited with {st}: {}", self.log_text());
            }
            assert!(
                Instant::now() < deadline,
                "prometheus: {what} not reached in 90 s: {}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(250));
        }
    }
}

impl Drop for PromServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One PromQL expression of a Grafana panel.
#[derive(Debug, Clone)]
pub struct PanelQuery {
    pub dashboard: String,
    pub panel: String,
    pub ref_id: String,
    /// As written in the dashboard (with Grafana variables).
    pub raw: String,
    /// With Grafana's variables replaced by what Grafana would send.
    pub promql: String,
}

/// Replaces the Grafana variables the dashboards use by concrete values.
pub fn expand_grafana_vars(expr: &str) -> String {
    expr.replace("$__rate_interval", "1m")
        .replace("$__interval", "15s")
        .replace("$__range", "1h")
        .replace("${job}", ".*")
        .replace("$job", ".*")
        .replace("${instance}", ".*")
        .replace("$instance", ".*")
}

/// The Grafana dashboard files in `dashboards/grafana`, sorted.
pub fn dashboard_files() -> Vec<PathBuf> {
    let dir = dashboards_dir().join("grafana");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .collect();
    files.sort();
    files
}

/// Every panel of a dashboard, rows' nested panels included.
pub fn panels(dashboard: &serde_json::Value) -> Vec<&serde_json::Value> {
    let mut out = Vec::new();
    for p in dashboard["panels"].as_array().into_iter().flatten() {
        out.push(p);
        for inner in p["panels"].as_array().into_iter().flatten() {
            out.push(inner);
        }
    }
    out
}

/// Every PromQL expression of every panel of every dashboard.
pub fn dashboard_queries() -> Vec<PanelQuery> {
    let mut out = Vec::new();
    for f in dashboard_files() {
        let text = std::fs::read_to_string(&f).unwrap_or_else(|e| panic!("{}: {e}", f.display()));
        let d: serde_json::Value = serde_json::from_str(&text)
            .unwrap_or_else(|e| panic!("{} is not JSON: {e}", f.display()));
        for p in panels(&d) {
            for t in p["targets"].as_array().into_iter().flatten() {
                let raw = t["expr"].as_str().unwrap_or_default().to_string();
                out.push(PanelQuery {
                    dashboard: f
                        .file_name()
                        .map(|n| n.to_string_lossy().into_owned())
                        .unwrap_or_default(),
                    panel: p["title"].as_str().unwrap_or_default().to_string(),
                    ref_id: t["refId"].as_str().unwrap_or_default().to_string(),
                    promql: expand_grafana_vars(&raw),
                    raw,
                });
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metric_names_are_found_whole() {
        let n = warden_metric_names(
            "rate(warden_sessions_total{a=\"b\"}[5m]) / x:warden_y + warden_sealed\nwarden's",
        );
        assert_eq!(n, vec!["warden_sessions_total", "warden_sealed"]);
    }

    #[test]
    fn samples_and_names_are_read_from_an_exposition() {
        let e = "# HELP a x\n# TYPE a counter\na{x=\"1\"} 3\nb 4.5\n";
        assert_eq!(exposed_names(e), vec!["a", "b"]);
        assert_eq!(sample(e, "a{x=\"1\"}"), Some(3.0));
        assert_eq!(sample(e, "b"), Some(4.5));
        assert_eq!(sample(e, "c"), None);
    }
}
