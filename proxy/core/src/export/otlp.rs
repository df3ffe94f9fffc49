//! `kind = "otlp"`: OTLP/HTTP logs in the JSON encoding — one `POST
//! ENDPOINT` (`…/v1/logs`, `Content-Type: application/json`) per batch,
//! through warden's one outbound HTTP client ([`crate::webhook::post`]:
//! plain HTTP or TLS verified against the system roots). A batch is one
//! `resourceLogs` entry (`service.name = warden`, `host.name`) with one
//! `logRecords` entry per item: `body` is the item's JSON, `attributes`
//! `warden.stream`, `warden.workload`, `warden.action`, … and the severity
//! maps info/warn/error. A 2xx answer is success; anything else, and any
//! connect or timeout failure, is retried with backoff by the sink thread.
//!
//! Header values may come from files (read once at start); they sit in
//! zeroized buffers and never appear in a log line or an error.

use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};
use zeroize::Zeroizing;

use super::{fields, hostname, Failure, Item, Output};
use crate::config::{ExportSink, HeaderValue};
use crate::error::{Error, Result};

pub(crate) struct OtlpOutput {
    endpoint: String,
    headers: Vec<(String, Zeroizing<String>)>,
    timeout: Duration,
    host: String,
    runtime: Option<tokio::runtime::Runtime>,
}

impl OtlpOutput {
    pub(crate) fn new(i: usize, s: &ExportSink) -> Result<OtlpOutput> {
        let endpoint = s
            .endpoint
            .clone()
            .ok_or_else(|| Error::usage(format!("export.sink[{i}].endpoint is not set")))?;
        let mut headers = Vec::with_capacity(s.headers.len());
        for (name, value) in &s.headers {
            let v = match value {
                HeaderValue::Literal(v) => Zeroizing::new(v.clone()),
                HeaderValue::File(p) => {
                    let raw = Zeroizing::new(std::fs::read(p).map_err(|e| {
                        Error::usage(format!(
                            "export.sink[{i}].headers.{name}: cannot read {}: {}; fix: create the file (readable by warden only) or change the path",
                            p.display(),
                            e.kind()
                        ))
                    })?);
                    let text = std::str::from_utf8(&raw).map_err(|_| {
                        Error::usage(format!(
                            "export.sink[{i}].headers.{name}: {} is not UTF-8 text",
                            p.display()
                        ))
                    })?;
                    let text = text.trim_end_matches(['\r', '\n']);
                    if text.contains(['\r', '\n', '\0']) {
                        return Err(Error::usage(format!(
                            "export.sink[{i}].headers.{name}: {} holds more than one line; fix: write the header's value on one line",
                            p.display()
                        )));
                    }
                    Zeroizing::new(text.to_string())
                }
            };
            headers.push((name.clone(), v));
        }
        Ok(OtlpOutput {
            endpoint,
            headers,
            timeout: s.timeout(),
            host: hostname(),
            runtime: None,
        })
    }
}

fn string(v: &str) -> Value {
    json!({ "stringValue": v })
}

fn nanos_of(time: Option<&str>) -> Option<i128> {
    let t = time?;
    time::OffsetDateTime::parse(t, &time::format_description::well_known::Rfc3339)
        .ok()
        .map(|t| t.unix_timestamp_nanos())
}

/// The `ExportLogsServiceRequest` JSON for `batch`.
pub(crate) fn body(batch: &[Arc<Item>], host: &str) -> Vec<u8> {
    let observed = time::OffsetDateTime::now_utc().unix_timestamp_nanos();
    let records: Vec<Value> = batch
        .iter()
        .map(|item| {
            let f = fields(item);
            let (number, text) = match f.severity {
                0..=3 => (17, "ERROR"),
                4 => (13, "WARN"),
                _ => (9, "INFO"),
            };
            let attributes: Vec<Value> = f
                .attrs
                .iter()
                .map(|(k, v)| json!({ "key": format!("warden.{k}"), "value": string(v) }))
                .collect();
            json!({
                "timeUnixNano": nanos_of(f.time.as_deref()).unwrap_or(observed).to_string(),
                "observedTimeUnixNano": observed.to_string(),
                "severityNumber": number,
                "severityText": text,
                "body": string(&item.json),
                "attributes": attributes,
            })
        })
        .collect();
    let doc = json!({
        "resourceLogs": [{
            "resource": { "attributes": [
                { "key": "service.name", "value": string("warden") },
                { "key": "service.version", "value": string(env!("CARGO_PKG_VERSION")) },
                { "key": "host.name", "value": string(host) },
            ]},
            "scopeLogs": [{
                "scope": { "name": "warden", "version": env!("CARGO_PKG_VERSION") },
                "logRecords": records,
            }],
        }]
    });
    serde_json::to_vec(&doc).unwrap_or_default()
}

impl Output for OtlpOutput {
    fn deliver(&mut self, batch: &[Arc<Item>]) -> std::result::Result<usize, Failure> {
        if self.runtime.is_none() {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| Failure::new(format!("cannot start the export runtime: {e}")))?;
            self.runtime = Some(rt);
        }
        let Some(rt) = &self.runtime else {
            return Err(Failure::new("no runtime"));
        };
        let payload = body(batch, &self.host);
        let headers: Vec<(&str, &str)> = self
            .headers
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        let shown = crate::config::url_for_display(&self.endpoint);
        let status = rt
            .block_on(crate::webhook::post(
                &self.endpoint,
                "application/json",
                &headers,
                &payload,
                self.timeout,
            ))
            .map_err(|e| Failure::new(format!("POST {shown}: {e}")))?;
        if (200..300).contains(&status) {
            Ok(batch.len())
        } else {
            Err(Failure::new(format!("POST {shown}: HTTP status {status}")))
        }
    }

    fn retries(&self) -> bool {
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ExportStream;

    #[test]
    fn the_body_is_an_otlp_logs_request() {
        let batch = vec![Arc::new(Item {
            stream: ExportStream::Audit,
            json: r#"{"seq":1,"time":"2026-12-06T10:00:00.000001Z","actor":{"kind":"workload","workload":"me"},"action":"session.start","target":{},"decision":"allow","reason":"ok"}"#.into(),
        })];
        let v: Value = serde_json::from_slice(&body(&batch, "node-1")).unwrap();
        let rec = &v["resourceLogs"][0]["scopeLogs"][0]["logRecords"][0];
        assert_eq!(rec["severityText"], "INFO");
        assert_eq!(rec["timeUnixNano"], "1796551200000001000");
        assert_eq!(rec["body"]["stringValue"], batch[0].json.as_ref());
        let attrs = rec["attributes"].as_array().unwrap();
        assert!(attrs
            .iter()
            .any(|a| a["key"] == "warden.workload" && a["value"]["stringValue"] == "me"));
        assert_eq!(
            v["resourceLogs"][0]["resource"]["attributes"][0]["value"]["stringValue"],
            "warden"
        );
    }
}
