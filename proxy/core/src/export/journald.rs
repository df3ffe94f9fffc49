//! `kind = "journald"`: the journal's native protocol — one datagram per
//! entry to `/run/systemd/journal/socket` (or `socket`), each field
//! `NAME=value\n`, or for a value with a newline `NAME\n` + its length as a
//! little-endian u64 + the value + `\n`.
//!
//! Fields: `MESSAGE` (a one-line summary), `PRIORITY`, `SYSLOG_IDENTIFIER=
//! warden`, `WARDEN_STREAM` (`audit`/`events`), `WARDEN_<NAME>` for the
//! record's main fields (`WARDEN_WORKLOAD`, `WARDEN_ACTION`,
//! `WARDEN_DECISION`, `WARDEN_VERDICT`, `WARDEN_ROUTE`, …) and `WARDEN_JSON`,
//! the record itself. Entries beyond a datagram's size (the socket's send
//! buffer) fail and are counted; audit records are at most 64 KiB.

use std::os::unix::net::UnixDatagram;
use std::path::PathBuf;
use std::sync::Arc;

use super::{fields, Failure, Item, Output};
use crate::config::{ExportSink, DEFAULT_JOURNALD_SOCKET};

pub(crate) struct JournaldOutput {
    socket: PathBuf,
    conn: Option<UnixDatagram>,
}

impl JournaldOutput {
    pub(crate) fn new(s: &ExportSink) -> JournaldOutput {
        JournaldOutput {
            socket: s
                .socket
                .clone()
                .unwrap_or_else(|| PathBuf::from(DEFAULT_JOURNALD_SOCKET)),
            conn: None,
        }
    }
}

fn field(out: &mut Vec<u8>, name: &str, value: &str) {
    out.extend_from_slice(name.as_bytes());
    if value.contains('\n') {
        out.push(b'\n');
        out.extend_from_slice(&(value.len() as u64).to_le_bytes());
    } else {
        out.push(b'=');
    }
    out.extend_from_slice(value.as_bytes());
    out.push(b'\n');
}

/// The datagram for one entry.
pub(crate) fn encode(item: &Item) -> Vec<u8> {
    let f = fields(item);
    let mut out = Vec::with_capacity(item.json.len() * 2 + 256);
    field(&mut out, "MESSAGE", &f.summary);
    field(&mut out, "PRIORITY", &f.severity.to_string());
    field(&mut out, "SYSLOG_IDENTIFIER", "warden");
    for (name, value) in &f.attrs {
        let upper = format!("WARDEN_{}", name.to_ascii_uppercase());
        field(&mut out, &upper, value);
    }
    field(&mut out, "WARDEN_JSON", &item.json);
    out
}

impl Output for JournaldOutput {
    fn deliver(&mut self, batch: &[Arc<Item>]) -> std::result::Result<usize, Failure> {
        let to = self.socket.display().to_string();
        for (n, item) in batch.iter().enumerate() {
            if self.conn.is_none() {
                let s = UnixDatagram::unbound().map_err(|e| Failure {
                    delivered: n,
                    why: format!("cannot open a datagram socket: {e}"),
                })?;
                let _ = s.set_write_timeout(Some(std::time::Duration::from_secs(1)));
                self.conn = Some(s);
            }
            let Some(s) = &self.conn else {
                return Err(Failure::new("no socket"));
            };
            if let Err(e) = s.send_to(&encode(item), &self.socket) {
                return Err(Failure {
                    delivered: n,
                    why: format!("cannot send to {to}: {e}"),
                });
            }
        }
        Ok(batch.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ExportStream;

    #[test]
    fn fields_use_the_native_format() {
        let item = Item {
            stream: ExportStream::Audit,
            json: r#"{"seq":1,"actor":{"kind":"workload","workload":"me"},"action":"session.start","target":{},"decision":"allow","reason":"line one\nline two"}"#.into(),
        };
        let d = encode(&item);
        let text = String::from_utf8_lossy(&d);
        assert!(text.contains("\nWARDEN_WORKLOAD=me\n"), "{text}");
        assert!(text.contains("\nWARDEN_ACTION=session.start\n"), "{text}");
        assert!(text.contains("\nPRIORITY=6\n"), "{text}");
        // The summary holds a newline: binary form, NAME\n + le64 length.
        let at = d.windows(8).position(|w| w == b"MESSAGE\n").unwrap();
        let len = u64::from_le_bytes(d[at + 8..at + 16].try_into().unwrap()) as usize;
        assert_eq!(
            &d[at + 16..at + 16 + len],
            b"session.start allow: line one\nline two"
        );
    }
}
