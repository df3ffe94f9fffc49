//! warden's own SQL sessions on a route's database: the administrative login
//! that creates and drops lease roles, and the login that rotates a static
//! role's password. Built on the same upstream login as client sessions
//! ([`upstream::connect`]: TLS mode, SCRAM, md5) plus the simple-query
//! protocol, which runs a multi-statement string as one implicit transaction.
//!
//! Quoting: identifiers go through [`quote_ident`], literals through
//! [`quote_literal`] (the `E'…'` form, safe whatever
//! `standard_conforming_strings` says). Both refuse NUL. Query text that
//! carries a verifier is held in a zeroized buffer.

use super::protocol::{self, BackendMessage, ErrorFields, StartupMessage};
use super::scram::ScramKeyCache;
use super::upstream::{self, Login, UpstreamFailure, UpstreamStream, UpstreamTarget};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use zeroize::Zeroizing;

/// Longest one statement batch may take.
const QUERY_TIMEOUT: Duration = Duration::from_secs(30);

/// `"name"` with embedded quotes doubled. None for a name PostgreSQL cannot
/// hold (empty, NUL, longer than 63 bytes).
pub fn quote_ident(name: &str) -> Option<String> {
    if name.is_empty() || name.len() > 63 || name.contains('\0') {
        return None;
    }
    Some(format!("\"{}\"", name.replace('"', "\"\"")))
}

/// `E'text'` with `\` and `'` escaped. None if the text holds a NUL.
pub fn quote_literal(text: &str) -> Option<String> {
    if text.contains('\0') {
        return None;
    }
    Some(format!(
        "E'{}'",
        text.replace('\\', "\\\\").replace('\'', "''")
    ))
}

/// Why a statement batch failed.
pub enum SqlError {
    /// Connection or protocol failure (the session is unusable).
    Link(String),
    /// The server refused a statement; the batch was rolled back.
    Server(ErrorFields),
}

impl std::fmt::Display for SqlError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SqlError::Link(m) => f.write_str(m),
            SqlError::Server(e) => write!(
                f,
                "{} {}",
                e.code().unwrap_or("?????"),
                e.message().unwrap_or("(no message)")
            ),
        }
    }
}

/// Text of a login failure, for logs and audit reasons (never holds the password).
pub fn describe_failure(f: &UpstreamFailure) -> String {
    match f {
        UpstreamFailure::Unreachable(m)
        | UpstreamFailure::Rejected(m)
        | UpstreamFailure::Unsupported(m)
        | UpstreamFailure::Protocol(m) => m.clone(),
        UpstreamFailure::Server(e) => format!(
            "{} {}",
            e.code().unwrap_or("?????"),
            e.message().unwrap_or("")
        ),
    }
}

/// One logged-in session that runs simple queries.
pub struct SqlSession {
    stream: UpstreamStream,
    buf: Vec<u8>,
}

/// Rows of text values (`None` = SQL NULL).
pub type Rows = Vec<Vec<Option<String>>>;

impl SqlSession {
    /// Logs in to `database` on `target` as `login`.
    pub async fn connect(
        target: &UpstreamTarget,
        database: &str,
        login: &Login,
        cache: &ScramKeyCache,
    ) -> Result<SqlSession, UpstreamFailure> {
        let mut startup = StartupMessage {
            protocol: (3, 0),
            params: Vec::new(),
        };
        startup.set("user", &login.user);
        startup.set("database", database);
        startup.set("application_name", "warden");
        let est = upstream::connect(target, &startup, login, cache).await?;
        Ok(SqlSession {
            stream: est.stream,
            buf: Vec::new(),
        })
    }

    /// Runs `sql` (one or more statements; one implicit transaction) and
    /// returns the rows of the last result set.
    pub async fn execute(&mut self, sql: &str) -> Result<Rows, SqlError> {
        let mut msg = Zeroizing::new(Vec::with_capacity(sql.len() + 6));
        msg.push(b'Q');
        msg.extend_from_slice(
            &u32::try_from(sql.len() + 5)
                .unwrap_or(u32::MAX)
                .to_be_bytes(),
        );
        msg.extend_from_slice(sql.as_bytes());
        msg.push(0);
        match tokio::time::timeout(QUERY_TIMEOUT, self.round_trip(&msg)).await {
            Ok(r) => r,
            Err(_) => Err(SqlError::Link(format!(
                "the database did not answer within {} s",
                QUERY_TIMEOUT.as_secs()
            ))),
        }
    }

    async fn round_trip(&mut self, msg: &[u8]) -> Result<Rows, SqlError> {
        self.stream
            .write_all(msg)
            .await
            .map_err(|e| SqlError::Link(format!("write to the database failed: {e}")))?;
        let mut rows = Vec::new();
        let mut error = None;
        loop {
            match self.read().await? {
                BackendMessage::Other { tag: b'T', .. } => rows.clear(),
                BackendMessage::Other { tag: b'D', body } => rows.push(parse_row(&body)?),
                BackendMessage::ErrorResponse(e) => error = Some(e),
                BackendMessage::ReadyForQuery { .. } => {
                    return match error {
                        Some(e) => Err(SqlError::Server(e)),
                        None => Ok(rows),
                    }
                }
                _ => {}
            }
        }
    }

    async fn read(&mut self) -> Result<BackendMessage, SqlError> {
        loop {
            match protocol::parse_backend(&self.buf) {
                Ok(Some((m, used))) => {
                    self.buf.drain(..used);
                    return Ok(m);
                }
                Ok(None) => {}
                Err(e) => return Err(SqlError::Link(format!("invalid message: {e}"))),
            }
            let mut chunk = [0u8; 8192];
            let n = self
                .stream
                .read(&mut chunk)
                .await
                .map_err(|e| SqlError::Link(format!("read from the database failed: {e}")))?;
            if n == 0 {
                return Err(SqlError::Link("the database closed the connection".into()));
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }

    /// Sends Terminate and closes.
    pub async fn close(mut self) {
        let _ = self.stream.write_all(&[b'X', 0, 0, 0, 4]).await;
        let _ = self.stream.shutdown().await;
    }
}

fn parse_row(body: &[u8]) -> Result<Vec<Option<String>>, SqlError> {
    let bad = || SqlError::Link("malformed DataRow".into());
    let n = u16::from_be_bytes([
        *body.first().ok_or_else(bad)?,
        *body.get(1).ok_or_else(bad)?,
    ]);
    let mut at = 2usize;
    let mut out = Vec::with_capacity(usize::from(n));
    for _ in 0..n {
        let len_bytes: [u8; 4] = body
            .get(at..at + 4)
            .and_then(|b| b.try_into().ok())
            .ok_or_else(bad)?;
        at += 4;
        let len = i32::from_be_bytes(len_bytes);
        if len < 0 {
            out.push(None);
            continue;
        }
        let end = at + len as usize;
        let v = body.get(at..end).ok_or_else(bad)?;
        out.push(Some(String::from_utf8_lossy(v).into_owned()));
        at = end;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identifiers_and_literals_are_quoted() {
        assert_eq!(quote_ident("app").as_deref(), Some("\"app\""));
        assert_eq!(
            quote_ident("a\"; DROP ROLE x; --").as_deref(),
            Some("\"a\"\"; DROP ROLE x; --\"")
        );
        assert_eq!(quote_ident(""), None);
        assert_eq!(quote_ident("a\0b"), None);
        assert_eq!(quote_ident(&"x".repeat(64)), None);
        assert_eq!(quote_literal("it's").as_deref(), Some("E'it''s'"));
        assert_eq!(quote_literal("a\\'b").as_deref(), Some("E'a\\\\''b'"));
        assert_eq!(quote_literal("\0"), None);
    }

    #[test]
    fn data_rows_parse_and_bad_ones_do_not_panic() {
        let mut body = vec![0, 2];
        body.extend_from_slice(&3i32.to_be_bytes());
        body.extend_from_slice(b"abc");
        body.extend_from_slice(&(-1i32).to_be_bytes());
        let row = parse_row(&body).ok().unwrap_or_default();
        assert_eq!(row, vec![Some("abc".to_string()), None]);
        for cut in 0..body.len() {
            let _ = parse_row(&body[..cut]);
        }
        let mut huge = vec![0, 1];
        huge.extend_from_slice(&i32::MAX.to_be_bytes());
        assert!(parse_row(&huge).is_err());
    }
}
