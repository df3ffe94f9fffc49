//! `kind = "syslog"`: RFC 5424 messages over a unix datagram socket
//! (`/dev/log` by default), UDP, or TCP with octet-counting framing
//! (RFC 6587 §3.4.1):
//!
//! ```text
//! <PRI>1 TIMESTAMP HOST warden PID audit [warden@32473 stream="audit" action="session.start" …] {"seq":…}
//! ```
//!
//! PRI is facility × 8 + severity (info for allowed, warning for denied,
//! err for errors), MSGID `audit` or `event`, the structured data the
//! record's main fields (32473 is the enterprise number RFC 5612 reserves
//! for documentation), and the message the record's JSON itself.

use std::io::Write;
use std::net::{TcpStream, ToSocketAddrs, UdpSocket};
use std::os::unix::net::UnixDatagram;
use std::sync::Arc;
use std::time::Duration;

use super::{fields, hostname, Failure, Item, Output};
use crate::config::{
    ExportSink, ExportStream, SyslogAddress, SyslogFacility, DEFAULT_SYSLOG_ADDRESS,
};
use crate::error::{Error, Result};

pub(crate) struct SyslogOutput {
    address: SyslogAddress,
    facility: u8,
    timeout: Duration,
    host: String,
    pid: u32,
    conn: Option<Conn>,
}

enum Conn {
    Unix(UnixDatagram),
    Udp(UdpSocket),
    Tcp(TcpStream),
}

impl SyslogOutput {
    pub(crate) fn new(s: &ExportSink) -> Result<SyslogOutput> {
        let text = s.address.as_deref().unwrap_or(DEFAULT_SYSLOG_ADDRESS);
        let address = SyslogAddress::parse(text)
            .map_err(|p| Error::usage(format!("export sink {}: address {text:?} {p}", s.name())))?;
        Ok(SyslogOutput {
            address,
            facility: s.facility.unwrap_or(SyslogFacility::Authpriv).code(),
            timeout: s.timeout(),
            host: hostname(),
            pid: std::process::id(),
            conn: None,
        })
    }

    fn connect(&self) -> std::io::Result<Conn> {
        Ok(match &self.address {
            SyslogAddress::Unix(_) => {
                let s = UnixDatagram::unbound()?;
                s.set_write_timeout(Some(self.timeout))?;
                Conn::Unix(s)
            }
            SyslogAddress::Udp(host, port) => {
                let target = (host.as_str(), *port)
                    .to_socket_addrs()?
                    .next()
                    .ok_or_else(|| std::io::Error::other("no address"))?;
                let local = if target.is_ipv4() {
                    "0.0.0.0:0"
                } else {
                    "[::]:0"
                };
                let s = UdpSocket::bind(local)?;
                s.connect(target)?;
                Conn::Udp(s)
            }
            SyslogAddress::Tcp(host, port) => {
                let target = (host.as_str(), *port)
                    .to_socket_addrs()?
                    .next()
                    .ok_or_else(|| std::io::Error::other("no address"))?;
                let s = TcpStream::connect_timeout(&target, self.timeout)?;
                s.set_write_timeout(Some(self.timeout))?;
                s.set_nodelay(true)?;
                Conn::Tcp(s)
            }
        })
    }

    fn describe(&self) -> String {
        match &self.address {
            SyslogAddress::Unix(p) => format!("unix:{}", p.display()),
            SyslogAddress::Udp(h, p) => format!("udp:{h}:{p}"),
            SyslogAddress::Tcp(h, p) => format!("tcp:{h}:{p}"),
        }
    }
}

/// One RFC 5424 message for `item`.
pub(crate) fn format_message(item: &Item, facility: u8, host: &str, pid: u32) -> String {
    let f = fields(item);
    let pri = u16::from(facility) * 8 + u16::from(f.severity);
    let msgid = match item.stream {
        ExportStream::Audit => "audit",
        ExportStream::Events => "event",
    };
    let time = crate::timefmt::format_micros_utc(time::OffsetDateTime::now_utc())
        .unwrap_or_else(|| "-".into());
    let mut sd = String::from("[warden@32473");
    for (k, v) in &f.attrs {
        sd.push(' ');
        sd.push_str(k);
        sd.push_str("=\"");
        for ch in v.chars() {
            if matches!(ch, '"' | '\\' | ']') {
                sd.push('\\');
            }
            sd.push(ch);
        }
        sd.push('"');
    }
    sd.push(']');
    let host: String = host
        .chars()
        .filter(|c| c.is_ascii_graphic())
        .take(255)
        .collect();
    let host = if host.is_empty() { "-".into() } else { host };
    format!(
        "<{pri}>1 {time} {host} warden {pid} {msgid} {sd} {}",
        item.json
    )
}

impl Output for SyslogOutput {
    fn deliver(&mut self, batch: &[Arc<Item>]) -> std::result::Result<usize, Failure> {
        let to = self.describe();
        for (n, item) in batch.iter().enumerate() {
            if self.conn.is_none() {
                let c = self.connect().map_err(|e| Failure {
                    delivered: n,
                    why: format!("cannot connect to {to}: {e}"),
                })?;
                self.conn = Some(c);
            }
            let msg = format_message(item, self.facility, &self.host, self.pid);
            let sent = match (&mut self.conn, &self.address) {
                (Some(Conn::Unix(s)), SyslogAddress::Unix(p)) => {
                    s.send_to(msg.as_bytes(), p).map(|_| ())
                }
                (Some(Conn::Udp(s)), _) => s.send(msg.as_bytes()).map(|_| ()),
                (Some(Conn::Tcp(s)), _) => {
                    let framed = format!("{} {msg}", msg.len());
                    s.write_all(framed.as_bytes())
                }
                _ => Err(std::io::Error::other("not connected")),
            };
            if let Err(e) = sent {
                self.conn = None;
                return Err(Failure {
                    delivered: n,
                    why: format!("cannot send to {to}: {e}"),
                });
            }
        }
        Ok(batch.len())
    }

    fn retries(&self) -> bool {
        matches!(self.address, SyslogAddress::Tcp(..))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_follow_rfc5424() {
        let item = Item {
            stream: ExportStream::Audit,
            json: r#"{"seq":3,"actor":{"kind":"workload","workload":"me"},"action":"session.start","target":{"route":"a]b"},"decision":"allow","reason":"ok"}"#.into(),
        };
        let m = format_message(&item, 10, "node-1", 77);
        // authpriv (10) * 8 + info (6)
        assert!(m.starts_with("<86>1 "), "{m}");
        let parts: Vec<&str> = m.splitn(8, ' ').collect();
        assert!(parts[1].ends_with('Z') && parts[1].contains('T'), "{m}");
        assert_eq!(&parts[2..6], &["node-1", "warden", "77", "audit"]);
        assert!(
            m.contains("[warden@32473 stream=\"audit\" workload=\"me\""),
            "{m}"
        );
        assert!(m.contains("route=\"a\\]b\""), "{m}");
        assert!(m.ends_with(&*item.json), "{m}");
    }
}
