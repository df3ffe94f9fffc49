//! PostgreSQL v3 frontend/backend message codec: only what a
//! credential-injecting proxy needs.
//!
//! warden sits between a legacy client (which connects with no password) and
//! the real server (to which warden logs in with the injected credential). It
//! therefore has to:
//!
//! - read what a **client** sends first ([`parse_startup`]): SSLRequest,
//!   GSSENCRequest, CancelRequest or StartupMessage. These are the protocol's
//!   untyped messages: `Int32 length` (counting itself), then `Int32 code`;
//! - read the typed **backend** messages of the upstream login
//!   ([`parse_backend`]): authentication requests, ParameterStatus,
//!   BackendKeyData, ReadyForQuery, ErrorResponse and NoticeResponse;
//! - write the frontend messages of that login (`p` password / SASL
//!   messages, [`StartupMessage::encode`], [`cancel_request`],
//!   [`ssl_request`]) and the backend messages warden itself sends to the
//!   client ([`authentication_ok`], [`parameter_status`],
//!   [`backend_key_data`], [`ready_for_query`], [`error_response`],
//!   [`notice_response`]).
//!
//! Everything here is pure: parsers take the bytes buffered so far and answer
//! `Ok(None)` when more are needed, `Ok(Some((message, consumed)))` or a
//! [`ProtocolError`]. A valid prefix is never an error, and a length field is
//! checked as soon as it has arrived, so a hostile peer cannot make warden
//! buffer more than the limit. No parser panics on any input.
//!
//! Protocol strings cannot hold a NUL byte. The encoders cut every string at
//! its first NUL, so no value can smuggle an extra parameter or field into a
//! message.

use std::fmt;

/// Largest startup packet accepted (PostgreSQL's own `MAX_STARTUP_PACKET_LENGTH`).
pub const MAX_STARTUP_LEN: usize = 10_000;

/// Largest backend message [`parse_backend`] accepts. The messages of a login
/// (authentication, parameters, errors) are far smaller; the guard only stops
/// a hostile or confused server from making warden buffer without bound.
pub const MAX_BACKEND_LEN: usize = 1 << 20;

/// SSLRequest code (1234 << 16 | 5679).
pub const SSL_REQUEST_CODE: u32 = 80_877_103;
/// GSSENCRequest code (1234 << 16 | 5680).
pub const GSSENC_REQUEST_CODE: u32 = 80_877_104;
/// CancelRequest code (1234 << 16 | 5678).
pub const CANCEL_REQUEST_CODE: u32 = 80_877_102;

/// Newest minor version of protocol 3 that is accepted (3.2, PostgreSQL 18).
pub const MAX_MINOR_VERSION: u16 = 2;

/// Shortest and longest cancel key: 4 bytes in protocol 3.0, up to 256 in 3.2.
pub const MIN_CANCEL_KEY_LEN: usize = 4;
/// See [`MIN_CANCEL_KEY_LEN`].
pub const MAX_CANCEL_KEY_LEN: usize = 256;

/// Why bytes could not be parsed as the expected message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ProtocolError {
    /// The startup packet's length field is below the 8-byte header.
    #[error("startup packet length {len} is below the 8-byte minimum")]
    StartupTooShort { len: u32 },
    /// The startup packet's length field is above [`MAX_STARTUP_LEN`].
    #[error("startup packet length {len} exceeds the {max}-byte limit")]
    StartupTooLong { len: u32, max: usize },
    /// An SSLRequest, GSSENCRequest or CancelRequest of the wrong size.
    #[error("{request} has length {len}, expected {expected}")]
    RequestLength {
        request: &'static str,
        len: u32,
        expected: &'static str,
    },
    /// A request code in the reserved 1234.x range that is not a known request.
    #[error("unknown startup request code {code}")]
    UnknownRequestCode { code: u32 },
    /// A protocol version other than 3.0 to 3.2.
    #[error("unsupported frontend protocol {major}.{minor}: warden supports 3.0 to 3.{max_minor}", max_minor = MAX_MINOR_VERSION)]
    UnsupportedProtocol { major: u16, minor: u16 },
    /// The startup parameters are not a NUL-terminated list of NUL-terminated pairs.
    #[error("invalid startup packet layout: {reason}")]
    StartupLayout { reason: String },
    /// A startup parameter name or value is not UTF-8.
    #[error("startup parameter {which} is not valid UTF-8")]
    StartupNotUtf8 { which: String },
    /// The same startup parameter appears twice.
    #[error("startup parameter {key:?} appears more than once")]
    DuplicateParameter { key: String },
    /// The startup packet names no user.
    #[error("no PostgreSQL user name specified in startup packet")]
    MissingUser,
    /// A typed message's length field is below 4 (it counts itself).
    #[error("message {tag:?} has length {len}, below the 4-byte minimum")]
    MessageTooShort { tag: char, len: u32 },
    /// A typed message's length field is above the limit.
    #[error("message {tag:?} length {len} exceeds the {max}-byte limit")]
    MessageTooLong { tag: char, len: u32, max: usize },
    /// A typed message whose body does not match its type's layout.
    #[error("malformed {message}: {reason}")]
    Malformed {
        message: &'static str,
        reason: String,
    },
}

impl ProtocolError {
    /// The SQLSTATE to send the client when this error ends its session:
    /// `0A000` (feature_not_supported) for an unsupported protocol version,
    /// `28000` (invalid_authorization_specification) for a startup packet
    /// without a user, as PostgreSQL does, and `08P01` (protocol_violation)
    /// for everything else.
    pub fn sqlstate(&self) -> &'static str {
        match self {
            ProtocolError::UnsupportedProtocol { .. } => "0A000",
            ProtocolError::MissingUser => "28000",
            _ => "08P01",
        }
    }
}

fn malformed(message: &'static str, reason: impl Into<String>) -> ProtocolError {
    ProtocolError::Malformed {
        message,
        reason: reason.into(),
    }
}

// ---------------------------------------------------------------------------
// Small readers and writers.

fn read_u32(buf: &[u8], at: usize) -> Option<u32> {
    let b = buf.get(at..at.checked_add(4)?)?;
    Some(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
}

fn read_i32(buf: &[u8], at: usize) -> Option<i32> {
    read_u32(buf, at).map(|v| v as i32)
}

/// Splits a NUL-terminated string off the front: `(string, rest)`, or None
/// when there is no NUL.
fn split_cstr(buf: &[u8]) -> Option<(&[u8], &[u8])> {
    let nul = buf.iter().position(|&b| b == 0)?;
    Some((&buf[..nul], &buf[nul + 1..]))
}

/// Appends `s` up to its first NUL, then a NUL.
fn put_cstr(out: &mut Vec<u8>, s: &[u8]) {
    let end = s.iter().position(|&b| b == 0).unwrap_or(s.len());
    out.extend_from_slice(&s[..end]);
    out.push(0);
}

/// Starts a typed message: tag and a length placeholder. Finish with [`finish`].
fn begin(tag: u8) -> Vec<u8> {
    let mut out = Vec::with_capacity(64);
    out.push(tag);
    out.extend_from_slice(&[0; 4]);
    out
}

/// Fills in the length of a message started by [`begin`] (or, with
/// `start == 0`, of an untyped message whose first 4 bytes are the length).
fn finish(mut out: Vec<u8>, start: usize) -> Vec<u8> {
    // Messages built here are far below 2 GiB; saturate rather than wrap.
    let len = u32::try_from(out.len() - start).unwrap_or(u32::MAX);
    out[start..start + 4].copy_from_slice(&len.to_be_bytes());
    out
}

// ---------------------------------------------------------------------------
// Startup phase (client → warden).

/// The first message of a client connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StartupPacket {
    /// SSLRequest: the client asks for TLS; answer `S` or `N`.
    Ssl,
    /// GSSENCRequest: the client asks for GSSAPI encryption; answer `G` or `N`.
    GssEnc,
    /// CancelRequest for the session identified by the pair. The key is 4
    /// bytes in protocol 3.0, 4 to 256 in 3.2.
    Cancel {
        process_id: i32,
        secret_key: Vec<u8>,
    },
    /// StartupMessage.
    Startup(StartupMessage),
}

/// A StartupMessage: protocol version and the ordered parameters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StartupMessage {
    /// (major, minor); always 3.0 to 3.2 when parsed.
    pub protocol: (u16, u16),
    /// In the client's order: `user`, `database`, `options`,
    /// `application_name`, … Names are unique when parsed. Neither names nor
    /// values can hold a NUL byte on the wire: see [`StartupMessage::encode`].
    pub params: Vec<(String, String)>,
}

impl StartupMessage {
    /// The value of parameter `key`, if present.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.params
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    /// Sets `key` to `value`: in place when present (keeping the order),
    /// else appended.
    pub fn set(&mut self, key: &str, value: &str) {
        match self.params.iter_mut().find(|(k, _)| k == key) {
            Some((_, v)) => *v = value.to_string(),
            None => self.params.push((key.to_string(), value.to_string())),
        }
    }

    /// The wire form, to send upstream. A name or value holding a NUL byte
    /// (impossible for parsed messages) is cut at it, and a pair whose name
    /// is then empty is left out, so no value can inject another parameter.
    /// The caller keeps the total under [`MAX_STARTUP_LEN`] (PostgreSQL
    /// refuses longer packets).
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(64);
        out.extend_from_slice(&[0; 4]);
        let code = (u32::from(self.protocol.0) << 16) | u32::from(self.protocol.1);
        out.extend_from_slice(&code.to_be_bytes());
        for (k, v) in &self.params {
            if k.as_bytes().first().is_none_or(|&b| b == 0) {
                continue;
            }
            put_cstr(&mut out, k.as_bytes());
            put_cstr(&mut out, v.as_bytes());
        }
        out.push(0);
        finish(out, 0)
    }
}

/// Parses the first message a client sends, incrementally.
///
/// `Ok(None)`: more bytes are needed. `Ok(Some((packet, consumed)))`: one
/// packet, `consumed` bytes long (anything after it is the client's next
/// message). Errors: a length below 8 or above [`MAX_STARTUP_LEN`] (checked
/// as soon as the 4 length bytes are in), an unknown request code, a protocol
/// other than 3.0–3.2, a request of the wrong size, parameters that are not
/// NUL-terminated name/value pairs ending in an empty name, non-UTF-8,
/// duplicate names, or no `user`.
pub fn parse_startup(buf: &[u8]) -> Result<Option<(StartupPacket, usize)>, ProtocolError> {
    let Some(len) = read_u32(buf, 0) else {
        return Ok(None);
    };
    if len < 8 {
        return Err(ProtocolError::StartupTooShort { len });
    }
    if len as usize > MAX_STARTUP_LEN {
        return Err(ProtocolError::StartupTooLong {
            len,
            max: MAX_STARTUP_LEN,
        });
    }
    let Some(code) = read_u32(buf, 4) else {
        return Ok(None);
    };
    // Check the code (and the size it implies) before the body arrives.
    let request_length = |request: &'static str, expected: &'static str| {
        Err(ProtocolError::RequestLength {
            request,
            len,
            expected,
        })
    };
    match code {
        SSL_REQUEST_CODE if len != 8 => return request_length("SSLRequest", "8"),
        GSSENC_REQUEST_CODE if len != 8 => return request_length("GSSENCRequest", "8"),
        CANCEL_REQUEST_CODE
            if !(12 + MIN_CANCEL_KEY_LEN..=12 + MAX_CANCEL_KEY_LEN).contains(&(len as usize)) =>
        {
            return request_length("CancelRequest", "16 to 268");
        }
        SSL_REQUEST_CODE | GSSENC_REQUEST_CODE | CANCEL_REQUEST_CODE => {}
        _ => {
            let (major, minor) = ((code >> 16) as u16, (code & 0xffff) as u16);
            if major == 1234 {
                return Err(ProtocolError::UnknownRequestCode { code });
            }
            if major != 3 || minor > MAX_MINOR_VERSION {
                return Err(ProtocolError::UnsupportedProtocol { major, minor });
            }
        }
    }
    let Some(packet) = buf.get(..len as usize) else {
        return Ok(None);
    };
    let body = &packet[8..];
    let parsed = match code {
        SSL_REQUEST_CODE => StartupPacket::Ssl,
        GSSENC_REQUEST_CODE => StartupPacket::GssEnc,
        CANCEL_REQUEST_CODE => {
            let process_id =
                read_i32(body, 0).ok_or_else(|| malformed("CancelRequest", "short"))?;
            StartupPacket::Cancel {
                process_id,
                secret_key: body[4..].to_vec(),
            }
        }
        _ => StartupPacket::Startup(StartupMessage {
            protocol: ((code >> 16) as u16, (code & 0xffff) as u16),
            params: parse_startup_params(body)?,
        }),
    };
    Ok(Some((parsed, len as usize)))
}

fn startup_str(bytes: &[u8], which: impl FnOnce() -> String) -> Result<String, ProtocolError> {
    String::from_utf8(bytes.to_vec()).map_err(|_| ProtocolError::StartupNotUtf8 { which: which() })
}

fn parse_startup_params(body: &[u8]) -> Result<Vec<(String, String)>, ProtocolError> {
    let layout = |reason: String| ProtocolError::StartupLayout { reason };
    let mut params: Vec<(String, String)> = Vec::new();
    let mut rest = body;
    loop {
        let n = params.len() + 1;
        let Some((key, after_key)) = split_cstr(rest) else {
            return Err(layout(if params.is_empty() && rest.is_empty() {
                "no parameters and no terminator".to_string()
            } else {
                format!("parameter #{n} name is not NUL-terminated (missing list terminator?)")
            }));
        };
        if key.is_empty() {
            if !after_key.is_empty() {
                return Err(layout(format!(
                    "{} byte(s) after the list terminator",
                    after_key.len()
                )));
            }
            break;
        }
        let key = startup_str(key, || format!("#{n} name"))?;
        let Some((value, after_value)) = split_cstr(after_key) else {
            return Err(layout(format!(
                "parameter {key:?} has no NUL-terminated value"
            )));
        };
        let value = startup_str(value, || format!("{key:?} value"))?;
        if params.iter().any(|(k, _)| *k == key) {
            return Err(ProtocolError::DuplicateParameter { key });
        }
        params.push((key, value));
        rest = after_value;
    }
    if !params.iter().any(|(k, _)| k == "user") {
        return Err(ProtocolError::MissingUser);
    }
    Ok(params)
}

// ---------------------------------------------------------------------------
// Backend messages (upstream server → warden).

/// The fields of an ErrorResponse or NoticeResponse: `(type, value)` in the
/// server's order, e.g. `(b'S', "FATAL")`, `(b'C', "28P01")`, `(b'M', …)`.
///
/// Values are decoded as UTF-8 with invalid sequences replaced (a server may
/// report in its own encoding before `client_encoding` applies), so an
/// undecodable message never hides the error itself.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ErrorFields {
    pub fields: Vec<(u8, String)>,
}

impl ErrorFields {
    /// The first value of field `code` (e.g. `b'C'`).
    pub fn get(&self, code: u8) -> Option<&str> {
        self.fields
            .iter()
            .find(|(c, _)| *c == code)
            .map(|(_, v)| v.as_str())
    }

    /// SQLSTATE (`C`), e.g. `28P01`.
    pub fn code(&self) -> Option<&str> {
        self.get(b'C')
    }

    /// Primary message (`M`).
    pub fn message(&self) -> Option<&str> {
        self.get(b'M')
    }

    /// Severity: the non-localized `V` when present, else `S`.
    pub fn severity(&self) -> Option<&str> {
        self.get(b'V').or_else(|| self.get(b'S'))
    }

    /// These fields as an ErrorResponse (`E`), e.g. to forward the server's
    /// own error to the client unchanged.
    pub fn encode(&self) -> Vec<u8> {
        self.encode_as(b'E')
    }

    fn encode_as(&self, tag: u8) -> Vec<u8> {
        let mut out = begin(tag);
        for (code, value) in &self.fields {
            if *code == 0 {
                continue; // would end the list early
            }
            out.push(*code);
            put_cstr(&mut out, value.as_bytes());
        }
        out.push(0);
        finish(out, 1)
    }
}

impl fmt::Display for ErrorFields {
    /// `FATAL 28P01: password authentication failed for user "app"`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} {}: {}",
            self.severity().unwrap_or("ERROR"),
            self.code().unwrap_or("?????"),
            self.message().unwrap_or("(no message)")
        )
    }
}

/// A message from the server, as far as a login needs to understand it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BackendMessage {
    /// `R` 0: authenticated.
    AuthenticationOk,
    /// `R` 3: send the password in clear text.
    AuthenticationCleartextPassword,
    /// `R` 5: send `md5` + md5(md5(password + user) + salt).
    AuthenticationMd5Password { salt: [u8; 4] },
    /// `R` 10: SASL, with the server's mechanisms in its order of preference.
    AuthenticationSasl { mechanisms: Vec<String> },
    /// `R` 11: SASL challenge (SCRAM server-first-message).
    AuthenticationSaslContinue { data: Vec<u8> },
    /// `R` 12: SASL outcome (SCRAM server-final-message).
    AuthenticationSaslFinal { data: Vec<u8> },
    /// `R` with any other code: KerberosV5 (2), SCM credentials (6), GSS (7),
    /// GSSContinue (8), SSPI (9), … See [`auth_method_name`].
    AuthenticationOther { code: i32 },
    /// `S`: a run-time parameter's value.
    ParameterStatus { name: String, value: String },
    /// `K`: the pair that cancels this session's queries.
    BackendKeyData {
        process_id: i32,
        secret_key: Vec<u8>,
    },
    /// `Z`: ready for a query; status `I` (idle), `T` (in a transaction) or
    /// `E` (in a failed transaction).
    ReadyForQuery { status: u8 },
    /// `v`: the server speaks an older minor version and/or does not know
    /// some `_pq_.` options of the startup packet.
    NegotiateProtocolVersion {
        newest_minor: i32,
        unrecognized: Vec<String>,
    },
    /// `E`.
    ErrorResponse(ErrorFields),
    /// `N`.
    NoticeResponse(ErrorFields),
    /// Any other message, unparsed.
    Other { tag: u8, body: Vec<u8> },
}

impl BackendMessage {
    /// A short description for logs and error messages. Never includes SASL
    /// data or cancel keys.
    pub fn describe(&self) -> String {
        match self {
            BackendMessage::AuthenticationOk => "AuthenticationOk".into(),
            BackendMessage::AuthenticationCleartextPassword => {
                "AuthenticationCleartextPassword".into()
            }
            BackendMessage::AuthenticationMd5Password { .. } => "AuthenticationMD5Password".into(),
            BackendMessage::AuthenticationSasl { mechanisms } => {
                format!("AuthenticationSASL ({})", mechanisms.join(", "))
            }
            BackendMessage::AuthenticationSaslContinue { .. } => {
                "AuthenticationSASLContinue".into()
            }
            BackendMessage::AuthenticationSaslFinal { .. } => "AuthenticationSASLFinal".into(),
            BackendMessage::AuthenticationOther { code } => {
                format!(
                    "Authentication request {code} ({})",
                    auth_method_name(*code)
                )
            }
            BackendMessage::ParameterStatus { name, .. } => format!("ParameterStatus ({name})"),
            BackendMessage::BackendKeyData { .. } => "BackendKeyData".into(),
            BackendMessage::ReadyForQuery { status } => {
                format!("ReadyForQuery ({:?})", char::from(*status))
            }
            BackendMessage::NegotiateProtocolVersion { newest_minor, .. } => {
                format!("NegotiateProtocolVersion (server supports up to 3.{newest_minor})")
            }
            BackendMessage::ErrorResponse(e) => format!("ErrorResponse ({e})"),
            BackendMessage::NoticeResponse(e) => format!("NoticeResponse ({e})"),
            BackendMessage::Other { tag, body } => format!(
                "{} ({:?}, {} bytes)",
                backend_tag_name(*tag),
                char::from(*tag),
                body.len()
            ),
        }
    }
}

/// The name of an authentication request code, for messages.
pub fn auth_method_name(code: i32) -> &'static str {
    match code {
        0 => "ok",
        2 => "Kerberos V5",
        3 => "cleartext password",
        5 => "MD5 password",
        6 => "SCM credentials",
        7 => "GSSAPI",
        8 => "GSSAPI continue",
        9 => "SSPI",
        10 => "SASL",
        11 => "SASL continue",
        12 => "SASL final",
        _ => "unknown",
    }
}

fn backend_tag_name(tag: u8) -> &'static str {
    match tag {
        b'1' => "ParseComplete",
        b'2' => "BindComplete",
        b'3' => "CloseComplete",
        b'A' => "NotificationResponse",
        b'C' => "CommandComplete",
        b'c' => "CopyDone",
        b'D' => "DataRow",
        b'd' => "CopyData",
        b'G' => "CopyInResponse",
        b'H' => "CopyOutResponse",
        b'I' => "EmptyQueryResponse",
        b'n' => "NoData",
        b's' => "PortalSuspended",
        b'T' => "RowDescription",
        b't' => "ParameterDescription",
        b'V' => "FunctionCallResponse",
        b'W' => "CopyBothResponse",
        _ => "unknown message",
    }
}

/// Parses one backend message, incrementally, with the [`MAX_BACKEND_LEN`]
/// guard. See [`parse_backend_limited`].
pub fn parse_backend(buf: &[u8]) -> Result<Option<(BackendMessage, usize)>, ProtocolError> {
    parse_backend_limited(buf, MAX_BACKEND_LEN)
}

/// Parses one backend message (`Byte1 tag`, `Int32 length` counting itself,
/// body), refusing a length above `max_len` (the whole message, tag
/// included) as soon as the length field has arrived.
///
/// `Ok(None)`: more bytes are needed. `Ok(Some((message, consumed)))`.
/// Known messages are checked strictly (exact size, NUL-terminated strings,
/// nothing trailing); unknown ones come back as [`BackendMessage::Other`].
pub fn parse_backend_limited(
    buf: &[u8],
    max_len: usize,
) -> Result<Option<(BackendMessage, usize)>, ProtocolError> {
    let Some(&tag) = buf.first() else {
        return Ok(None);
    };
    let Some(len) = read_u32(buf, 1) else {
        return Ok(None);
    };
    let shown = char::from(tag);
    if len < 4 {
        return Err(ProtocolError::MessageTooShort { tag: shown, len });
    }
    let total = len as usize + 1;
    if total > max_len {
        return Err(ProtocolError::MessageTooLong {
            tag: shown,
            len,
            max: max_len,
        });
    }
    let Some(message) = buf.get(..total) else {
        return Ok(None);
    };
    let body = &message[5..];
    let parsed = match tag {
        b'R' => parse_authentication(body)?,
        b'S' => {
            let what = "ParameterStatus";
            let (name, rest) =
                split_cstr(body).ok_or_else(|| malformed(what, "name is not NUL-terminated"))?;
            let (value, rest) =
                split_cstr(rest).ok_or_else(|| malformed(what, "value is not NUL-terminated"))?;
            no_trailing(what, rest)?;
            let name = String::from_utf8(name.to_vec())
                .map_err(|_| malformed(what, "name is not valid UTF-8"))?;
            BackendMessage::ParameterStatus {
                name,
                value: String::from_utf8_lossy(value).into_owned(),
            }
        }
        b'K' => {
            let process_id = read_i32(body, 0)
                .ok_or_else(|| malformed("BackendKeyData", "shorter than 4 bytes"))?;
            let key = &body[4..];
            if !(MIN_CANCEL_KEY_LEN..=MAX_CANCEL_KEY_LEN).contains(&key.len()) {
                return Err(malformed(
                    "BackendKeyData",
                    format!("secret key of {} bytes (4 to 256 expected)", key.len()),
                ));
            }
            BackendMessage::BackendKeyData {
                process_id,
                secret_key: key.to_vec(),
            }
        }
        b'Z' => match body {
            [status @ (b'I' | b'T' | b'E')] => BackendMessage::ReadyForQuery { status: *status },
            [other] => {
                return Err(malformed(
                    "ReadyForQuery",
                    format!("unknown transaction status {:?}", char::from(*other)),
                ))
            }
            _ => {
                return Err(malformed(
                    "ReadyForQuery",
                    format!("body of {} bytes, expected 1", body.len()),
                ))
            }
        },
        b'v' => {
            let what = "NegotiateProtocolVersion";
            let newest_minor = read_i32(body, 0).ok_or_else(|| malformed(what, "short"))?;
            let count = read_i32(body, 4).ok_or_else(|| malformed(what, "short"))?;
            let mut rest = &body[8..];
            let mut unrecognized = Vec::new();
            for _ in 0..count.max(0) {
                let (opt, r) = split_cstr(rest)
                    .ok_or_else(|| malformed(what, "fewer options than announced"))?;
                unrecognized.push(String::from_utf8_lossy(opt).into_owned());
                rest = r;
            }
            no_trailing(what, rest)?;
            BackendMessage::NegotiateProtocolVersion {
                newest_minor,
                unrecognized,
            }
        }
        b'E' => BackendMessage::ErrorResponse(parse_fields("ErrorResponse", body)?),
        b'N' => BackendMessage::NoticeResponse(parse_fields("NoticeResponse", body)?),
        _ => BackendMessage::Other {
            tag,
            body: body.to_vec(),
        },
    };
    Ok(Some((parsed, total)))
}

fn no_trailing(what: &'static str, rest: &[u8]) -> Result<(), ProtocolError> {
    if rest.is_empty() {
        Ok(())
    } else {
        Err(malformed(what, format!("{} trailing byte(s)", rest.len())))
    }
}

fn parse_authentication(body: &[u8]) -> Result<BackendMessage, ProtocolError> {
    let code = read_i32(body, 0)
        .ok_or_else(|| malformed("Authentication request", "shorter than 4 bytes"))?;
    let rest = &body[4..];
    let exact = |what: &'static str, n: usize| {
        if rest.len() == n {
            Ok(())
        } else {
            Err(malformed(
                what,
                format!("{} byte(s) after the code, expected {n}", rest.len()),
            ))
        }
    };
    Ok(match code {
        0 => {
            exact("AuthenticationOk", 0)?;
            BackendMessage::AuthenticationOk
        }
        3 => {
            exact("AuthenticationCleartextPassword", 0)?;
            BackendMessage::AuthenticationCleartextPassword
        }
        5 => {
            exact("AuthenticationMD5Password", 4)?;
            BackendMessage::AuthenticationMd5Password {
                salt: [rest[0], rest[1], rest[2], rest[3]],
            }
        }
        10 => {
            let what = "AuthenticationSASL";
            let mut mechanisms = Vec::new();
            let mut rest = rest;
            loop {
                let (name, r) = split_cstr(rest)
                    .ok_or_else(|| malformed(what, "mechanism list is not terminated"))?;
                if name.is_empty() {
                    no_trailing(what, r)?;
                    break;
                }
                let name = String::from_utf8(name.to_vec())
                    .map_err(|_| malformed(what, "mechanism name is not valid UTF-8"))?;
                mechanisms.push(name);
                rest = r;
            }
            BackendMessage::AuthenticationSasl { mechanisms }
        }
        11 => BackendMessage::AuthenticationSaslContinue {
            data: rest.to_vec(),
        },
        12 => BackendMessage::AuthenticationSaslFinal {
            data: rest.to_vec(),
        },
        other => BackendMessage::AuthenticationOther { code: other },
    })
}

fn parse_fields(what: &'static str, body: &[u8]) -> Result<ErrorFields, ProtocolError> {
    let mut fields = Vec::new();
    let mut rest = body;
    loop {
        let Some((&code, after)) = rest.split_first() else {
            return Err(malformed(what, "field list is not terminated"));
        };
        if code == 0 {
            no_trailing(what, after)?;
            break;
        }
        let (value, after) = split_cstr(after).ok_or_else(|| {
            malformed(
                what,
                format!("field {:?} is not NUL-terminated", char::from(code)),
            )
        })?;
        fields.push((code, String::from_utf8_lossy(value).into_owned()));
        rest = after;
    }
    Ok(ErrorFields { fields })
}

// ---------------------------------------------------------------------------
// Encoders: warden → upstream server.

/// SSLRequest (8 bytes).
pub fn ssl_request() -> Vec<u8> {
    let mut out = Vec::with_capacity(8);
    out.extend_from_slice(&8u32.to_be_bytes());
    out.extend_from_slice(&SSL_REQUEST_CODE.to_be_bytes());
    out
}

/// CancelRequest: 16 bytes for a 4-byte key (protocol 3.0), 12 + key length
/// for the longer keys of 3.2.
pub fn cancel_request(process_id: i32, secret_key: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(12 + secret_key.len());
    out.extend_from_slice(&[0; 4]);
    out.extend_from_slice(&CANCEL_REQUEST_CODE.to_be_bytes());
    out.extend_from_slice(&process_id.to_be_bytes());
    out.extend_from_slice(secret_key);
    finish(out, 0)
}

/// PasswordMessage (`p`) with `body` sent as is. For a cleartext or md5
/// password the caller appends the terminating NUL itself (the protocol's
/// String); SASL messages have their own encoders below. The result holds
/// the password, so it is zeroized on drop.
pub fn password_message(body: &[u8]) -> zeroize::Zeroizing<Vec<u8>> {
    let mut out = zeroize::Zeroizing::new(Vec::with_capacity(5 + body.len()));
    out.push(b'p');
    out.extend_from_slice(
        &u32::try_from(4 + body.len())
            .unwrap_or(u32::MAX)
            .to_be_bytes(),
    );
    out.extend_from_slice(body);
    out
}

/// SASLInitialResponse (`p`): the chosen mechanism and the client's first
/// message.
pub fn sasl_initial_response(mechanism: &str, data: &[u8]) -> Vec<u8> {
    let mut out = begin(b'p');
    put_cstr(&mut out, mechanism.as_bytes());
    out.extend_from_slice(&u32::try_from(data.len()).unwrap_or(u32::MAX).to_be_bytes());
    out.extend_from_slice(data);
    finish(out, 1)
}

/// SASLResponse (`p`): the client's next message (SCRAM client-final).
pub fn sasl_response(data: &[u8]) -> Vec<u8> {
    let mut out = begin(b'p');
    out.extend_from_slice(data);
    finish(out, 1)
}

/// Query (`Q`): simple query protocol (for warden's own statements, e.g. the
/// pool's reset; never client text).
pub fn query(sql: &str) -> Vec<u8> {
    let mut out = begin(b'Q');
    put_cstr(&mut out, sql.as_bytes());
    finish(out, 1)
}

/// Sync (`S`): ends an extended-query batch (answered by ReadyForQuery).
pub fn sync() -> Vec<u8> {
    finish(begin(b'S'), 1)
}

/// CopyFail (`f`): aborts a COPY FROM STDIN; ignored outside COPY.
pub fn copy_fail(message: &str) -> Vec<u8> {
    let mut out = begin(b'f');
    put_cstr(&mut out, message.as_bytes());
    finish(out, 1)
}

/// Terminate (`X`).
pub fn terminate() -> Vec<u8> {
    finish(begin(b'X'), 1)
}

// ---------------------------------------------------------------------------
// Encoders: warden → client.

/// AuthenticationOk (`R` 0).
pub fn authentication_ok() -> Vec<u8> {
    let mut out = begin(b'R');
    out.extend_from_slice(&0u32.to_be_bytes());
    finish(out, 1)
}

/// ParameterStatus (`S`).
pub fn parameter_status(name: &str, value: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(7 + name.len() + value.len());
    put_parameter_status(&mut out, name, value);
    out
}

/// Appends a ParameterStatus (`S`) to `out` (a greeting built in one buffer).
pub fn put_parameter_status(out: &mut Vec<u8>, name: &str, value: &str) {
    let start = out.len();
    out.push(b'S');
    out.extend_from_slice(&[0; 4]);
    put_cstr(out, name.as_bytes());
    put_cstr(out, value.as_bytes());
    let len = u32::try_from(out.len() - start - 1).unwrap_or(u32::MAX);
    out[start + 1..start + 5].copy_from_slice(&len.to_be_bytes());
}

/// BackendKeyData (`K`).
pub fn backend_key_data(process_id: i32, secret_key: &[u8]) -> Vec<u8> {
    let mut out = begin(b'K');
    out.extend_from_slice(&process_id.to_be_bytes());
    out.extend_from_slice(secret_key);
    finish(out, 1)
}

/// ReadyForQuery (`Z`) with transaction status `I`, `T` or `E`.
pub fn ready_for_query(status: u8) -> Vec<u8> {
    let mut out = begin(b'Z');
    out.push(status);
    finish(out, 1)
}

fn fields(
    severity: &str,
    sqlstate: &str,
    message: &str,
    detail: Option<&str>,
    hint: Option<&str>,
) -> ErrorFields {
    let mut fields = vec![
        (b'S', severity.to_string()),
        (b'V', severity.to_string()),
        (b'C', sqlstate.to_string()),
        (b'M', message.to_string()),
    ];
    if let Some(d) = detail {
        fields.push((b'D', d.to_string()));
    }
    if let Some(h) = hint {
        fields.push((b'H', h.to_string()));
    }
    ErrorFields { fields }
}

/// ErrorResponse (`E`) with fields S and V (`severity`, e.g. `FATAL`), C
/// (`sqlstate`), M, and D and H when given.
pub fn error_response(
    severity: &str,
    sqlstate: &str,
    message: &str,
    detail: Option<&str>,
    hint: Option<&str>,
) -> Vec<u8> {
    fields(severity, sqlstate, message, detail, hint).encode()
}

/// NoticeResponse (`N`), fields as in [`error_response`] (severity e.g.
/// `WARNING` or `NOTICE`).
#[allow(dead_code)] // part of the codec; the daemon sends no notice yet
pub fn notice_response(
    severity: &str,
    sqlstate: &str,
    message: &str,
    detail: Option<&str>,
    hint: Option<&str>,
) -> Vec<u8> {
    fields(severity, sqlstate, message, detail, hint).encode_as(b'N')
}

// ---------------------------------------------------------------------------

#[cfg(test)]
mod tests {
    use super::*;

    /// Protocol version 3.0 as sent in a StartupMessage (3 << 16).
    const PROTOCOL_3_0: u32 = 196_608;

    fn new_startup(params: Vec<(String, String)>) -> StartupMessage {
        StartupMessage {
            protocol: (3, 0),
            params,
        }
    }

    fn startup_bytes(params: &[(&str, &str)]) -> Vec<u8> {
        new_startup(
            params
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        )
        .encode()
    }

    /// A hand-built packet with an arbitrary code and body.
    fn raw_startup(code: u32, body: &[u8]) -> Vec<u8> {
        let mut out = ((8 + body.len()) as u32).to_be_bytes().to_vec();
        out.extend_from_slice(&code.to_be_bytes());
        out.extend_from_slice(body);
        out
    }

    fn parse_one(buf: &[u8]) -> StartupPacket {
        match parse_startup(buf) {
            Ok(Some((p, n))) => {
                assert_eq!(n, buf.len());
                p
            }
            other => panic!("expected a packet, got {other:?}"),
        }
    }

    fn startup_err(buf: &[u8]) -> ProtocolError {
        match parse_startup(buf) {
            Err(e) => e,
            other => panic!("expected an error, got {other:?}"),
        }
    }

    fn backend_one(buf: &[u8]) -> BackendMessage {
        match parse_backend(buf) {
            Ok(Some((m, n))) => {
                assert_eq!(n, buf.len());
                m
            }
            other => panic!("expected a message, got {other:?}"),
        }
    }

    fn backend_err(buf: &[u8]) -> ProtocolError {
        match parse_backend(buf) {
            Err(e) => e,
            other => panic!("expected an error, got {other:?}"),
        }
    }

    /// A typed message with an arbitrary tag and body.
    fn raw_backend(tag: u8, body: &[u8]) -> Vec<u8> {
        let mut out = vec![tag];
        out.extend_from_slice(&((4 + body.len()) as u32).to_be_bytes());
        out.extend_from_slice(body);
        out
    }

    #[test]
    fn startup_exact_bytes_and_round_trip() {
        let bytes = startup_bytes(&[("user", "app"), ("database", "orders")]);
        let mut expected = vec![0, 0, 0, 34, 0, 3, 0, 0];
        expected.extend_from_slice(b"user\0app\0database\0orders\0\0");
        assert_eq!(bytes, expected);
        let StartupPacket::Startup(m) = parse_one(&bytes) else {
            panic!("not a startup message")
        };
        assert_eq!(m.protocol, (3, 0));
        assert_eq!(m.get("user"), Some("app"));
        assert_eq!(m.get("database"), Some("orders"));
        assert_eq!(m.get("options"), None);
        assert_eq!(m.encode(), bytes);
    }

    #[test]
    fn startup_keeps_order_and_set_replaces_in_place() {
        let bytes = startup_bytes(&[
            ("application_name", "psql"),
            ("user", "legacy"),
            ("database", "orders"),
            ("options", "-c search_path=app"),
            ("client_encoding", "UTF8"),
            ("empty", ""),
        ]);
        let StartupPacket::Startup(mut m) = parse_one(&bytes) else {
            panic!("not a startup message")
        };
        let keys: Vec<&str> = m.params.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(
            keys,
            [
                "application_name",
                "user",
                "database",
                "options",
                "client_encoding",
                "empty"
            ]
        );
        assert_eq!(m.get("empty"), Some(""));
        m.set("user", "app_rw");
        m.set("replication", "false");
        assert_eq!(m.params[1], ("user".into(), "app_rw".into()));
        assert_eq!(
            m.params.last(),
            Some(&("replication".into(), "false".into()))
        );
        m.params.pop();
        let StartupPacket::Startup(again) = parse_one(&m.encode()) else {
            panic!("not a startup message")
        };
        assert_eq!(again, m);
    }

    #[test]
    fn startup_protocol_3_2_round_trips() {
        let m = StartupMessage {
            protocol: (3, 2),
            params: vec![("user".into(), "u".into())],
        };
        let bytes = m.encode();
        assert_eq!(&bytes[4..8], &((3u32 << 16) | 2).to_be_bytes());
        assert_eq!(parse_one(&bytes), StartupPacket::Startup(m));
    }

    #[test]
    fn encode_cannot_inject_parameters() {
        let mut m = new_startup(vec![("user".into(), "app".into())]);
        m.set("database", "orders\0user\0postgres");
        m.params.push(("\0evil".into(), "x".into()));
        let StartupPacket::Startup(back) = parse_one(&m.encode()) else {
            panic!("not a startup message")
        };
        assert_eq!(back.get("user"), Some("app"));
        assert_eq!(back.get("database"), Some("orders"));
        assert_eq!(back.params.len(), 2);
    }

    #[test]
    fn requests_round_trip() {
        assert_eq!(ssl_request(), raw_startup(SSL_REQUEST_CODE, b""));
        assert_eq!(parse_one(&ssl_request()), StartupPacket::Ssl);
        assert_eq!(
            parse_one(&raw_startup(GSSENC_REQUEST_CODE, b"")),
            StartupPacket::GssEnc
        );
        let cancel = cancel_request(-7, &[1, 2, 3, 4]);
        assert_eq!(cancel.len(), 16);
        assert_eq!(
            cancel,
            [0, 0, 0, 16, 4, 210, 22, 46, 255, 255, 255, 249, 1, 2, 3, 4]
        );
        assert_eq!(
            parse_one(&cancel),
            StartupPacket::Cancel {
                process_id: -7,
                secret_key: vec![1, 2, 3, 4]
            }
        );
        let long_key: Vec<u8> = (0..=255u8).collect();
        let cancel = cancel_request(42, &long_key);
        assert_eq!(cancel.len(), 268);
        assert_eq!(
            parse_one(&cancel),
            StartupPacket::Cancel {
                process_id: 42,
                secret_key: long_key
            }
        );
    }

    #[test]
    fn request_sizes_are_checked() {
        let e = startup_err(&raw_startup(SSL_REQUEST_CODE, &[0; 4]));
        assert_eq!(e.to_string(), "SSLRequest has length 12, expected 8");
        assert!(matches!(
            startup_err(&raw_startup(GSSENC_REQUEST_CODE, &[0])),
            ProtocolError::RequestLength { .. }
        ));
        for body_len in [0usize, 7, 4 + 257] {
            let e = startup_err(&raw_startup(CANCEL_REQUEST_CODE, &vec![0; body_len]));
            assert!(
                matches!(
                    e,
                    ProtocolError::RequestLength {
                        request: "CancelRequest",
                        ..
                    }
                ),
                "{body_len}: {e}"
            );
        }
    }

    #[test]
    fn every_truncation_of_a_valid_packet_needs_more() {
        let packets = [
            startup_bytes(&[
                ("user", "app"),
                ("database", "orders"),
                ("options", "-c x=y"),
            ]),
            ssl_request(),
            raw_startup(GSSENC_REQUEST_CODE, b""),
            cancel_request(1, &[9; 4]),
            cancel_request(1, &[9; 32]),
        ];
        for p in &packets {
            for cut in 0..p.len() {
                assert_eq!(parse_startup(&p[..cut]), Ok(None), "prefix of {cut} bytes");
            }
            // And with the client's next bytes already buffered, only the packet is consumed.
            let mut more = p.clone();
            more.extend_from_slice(b"Qselect 1");
            assert!(matches!(parse_startup(&more), Ok(Some((_, n))) if n == p.len()));
        }
    }

    #[test]
    fn absurd_lengths_fail_before_the_body_arrives() {
        let e = startup_err(&[0x00, 0x41, 0x89, 0x37]);
        assert_eq!(
            e.to_string(),
            "startup packet length 4294967 exceeds the 10000-byte limit"
        );
        assert_eq!(e.sqlstate(), "08P01");
        assert_eq!(
            startup_err(&u32::MAX.to_be_bytes()),
            ProtocolError::StartupTooLong {
                len: u32::MAX,
                max: MAX_STARTUP_LEN
            }
        );
        assert!(matches!(
            startup_err(&10_001u32.to_be_bytes()),
            ProtocolError::StartupTooLong { len: 10_001, .. }
        ));
        // Exactly the limit is fine (needs more bytes).
        assert_eq!(parse_startup(&10_000u32.to_be_bytes()), Ok(None));
        for len in 0..8u32 {
            assert_eq!(
                startup_err(&len.to_be_bytes()),
                ProtocolError::StartupTooShort { len }
            );
        }
        // A typed message sent as a startup packet ('Q' + length) reads as huge.
        assert!(matches!(
            startup_err(b"Q\0\0\0\x0dselect 1\0"),
            ProtocolError::StartupTooLong { .. }
        ));
    }

    #[test]
    fn protocol_versions() {
        let body = b"user\0u\0\0";
        for (major, minor) in [(2u32, 0u32), (4, 0), (3, 3), (3, 0xffff), (0, 0)] {
            let e = startup_err(&raw_startup((major << 16) | minor, body)[..8]);
            assert_eq!(
                e,
                ProtocolError::UnsupportedProtocol {
                    major: major as u16,
                    minor: minor as u16
                }
            );
            assert_eq!(e.sqlstate(), "0A000");
        }
        assert_eq!(
            startup_err(&raw_startup(2 << 16, body)).to_string(),
            "unsupported frontend protocol 2.0: warden supports 3.0 to 3.2"
        );
        for minor in 0..=2u32 {
            assert!(matches!(
                parse_one(&raw_startup((3 << 16) | minor, body)),
                StartupPacket::Startup(StartupMessage { protocol: (3, m), .. }) if u32::from(m) == minor
            ));
        }
        let e = startup_err(&raw_startup((1234 << 16) | 5681, b""));
        assert_eq!(e, ProtocolError::UnknownRequestCode { code: 80_877_105 });
        assert_eq!(e.sqlstate(), "08P01");
    }

    #[test]
    fn bad_parameter_layouts() {
        let cases: [(&[u8], &str); 7] = [
            (b"", "no parameters"),
            (b"user\0u\0", "not NUL-terminated"),
            (b"user\0u", "has no NUL-terminated value"),
            (b"user\0", "has no NUL-terminated value"),
            (b"user", "not NUL-terminated"),
            (b"user\0u\0\0x", "1 byte(s) after the list terminator"),
            (b"user\0u\0\0\0", "1 byte(s) after the list terminator"),
        ];
        for (body, want) in cases {
            let e = startup_err(&raw_startup(PROTOCOL_3_0, body));
            assert!(
                matches!(e, ProtocolError::StartupLayout { .. }) && e.to_string().contains(want),
                "{body:?}: {e}"
            );
            assert_eq!(e.sqlstate(), "08P01");
        }
        let e = startup_err(&raw_startup(PROTOCOL_3_0, b"database\0d\0\0"));
        assert_eq!(e, ProtocolError::MissingUser);
        assert_eq!(e.sqlstate(), "28000");
        let e = startup_err(&raw_startup(PROTOCOL_3_0, b"user\0a\0user\0b\0\0"));
        assert_eq!(
            e.to_string(),
            "startup parameter \"user\" appears more than once"
        );
        let e = startup_err(&raw_startup(PROTOCOL_3_0, b"user\0\xff\0\0"));
        assert_eq!(
            e.to_string(),
            "startup parameter \"user\" value is not valid UTF-8"
        );
        let e = startup_err(&raw_startup(PROTOCOL_3_0, b"user\0u\0\xc3\0v\0\0"));
        assert_eq!(
            e.to_string(),
            "startup parameter #2 name is not valid UTF-8"
        );
    }

    #[test]
    fn garbage_is_rejected() {
        assert!(startup_err(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            .to_string()
            .contains("exceeds"));
        assert!(matches!(
            startup_err(&raw_startup(0xdead_beef, b"")),
            ProtocolError::UnsupportedProtocol {
                major: 0xdead,
                minor: 0xbeef
            }
        ));
        assert!(backend_err(b"R\xff\xff\xff\xff")
            .to_string()
            .contains("exceeds"));
        assert!(matches!(
            backend_err(b"Z\0\0\0\x02"),
            ProtocolError::MessageTooShort { tag: 'Z', len: 2 }
        ));
    }

    #[test]
    fn authentication_requests() {
        let auth = |code: i32, rest: &[u8]| {
            let mut body = code.to_be_bytes().to_vec();
            body.extend_from_slice(rest);
            raw_backend(b'R', &body)
        };
        assert_eq!(authentication_ok(), auth(0, b""));
        assert_eq!(
            backend_one(&authentication_ok()),
            BackendMessage::AuthenticationOk
        );
        assert_eq!(
            backend_one(&auth(3, b"")),
            BackendMessage::AuthenticationCleartextPassword
        );
        assert_eq!(
            backend_one(&auth(5, &[1, 2, 3, 4])),
            BackendMessage::AuthenticationMd5Password { salt: [1, 2, 3, 4] }
        );
        assert_eq!(
            backend_one(&auth(10, b"SCRAM-SHA-256-PLUS\0SCRAM-SHA-256\0\0")),
            BackendMessage::AuthenticationSasl {
                mechanisms: vec!["SCRAM-SHA-256-PLUS".into(), "SCRAM-SHA-256".into()]
            }
        );
        assert_eq!(
            backend_one(&auth(11, b"r=abc,s=c2FsdA==,i=4096")),
            BackendMessage::AuthenticationSaslContinue {
                data: b"r=abc,s=c2FsdA==,i=4096".to_vec()
            }
        );
        assert_eq!(
            backend_one(&auth(12, b"v=xyz")),
            BackendMessage::AuthenticationSaslFinal {
                data: b"v=xyz".to_vec()
            }
        );
        for code in [2, 6, 7, 8, 9, 99, -1] {
            assert_eq!(
                backend_one(&auth(code, b"")),
                BackendMessage::AuthenticationOther { code }
            );
        }
        assert_eq!(auth_method_name(7), "GSSAPI");
        assert!(backend_one(&auth(9, b"")).describe().contains("SSPI"));
        // Strictness.
        assert!(backend_err(&auth(0, b"x"))
            .to_string()
            .contains("AuthenticationOk"));
        assert!(backend_err(&auth(5, &[1, 2, 3]))
            .to_string()
            .contains("expected 4"));
        assert!(backend_err(&auth(10, b"SCRAM-SHA-256\0"))
            .to_string()
            .contains("not terminated"));
        assert!(backend_err(&auth(10, b"SCRAM-SHA-256\0\0x"))
            .to_string()
            .contains("trailing"));
        assert!(backend_err(&raw_backend(b'R', &[0, 0]))
            .to_string()
            .contains("shorter than 4"));
    }

    #[test]
    fn warden_to_client_messages_round_trip() {
        assert_eq!(
            parameter_status("server_version", "17.2"),
            raw_backend(b'S', b"server_version\x0017.2\0")
        );
        assert_eq!(
            backend_one(&parameter_status("TimeZone", "Europe/Paris")),
            BackendMessage::ParameterStatus {
                name: "TimeZone".into(),
                value: "Europe/Paris".into()
            }
        );
        assert_eq!(
            backend_key_data(1234, &[5, 6, 7, 8]),
            raw_backend(b'K', &[0, 0, 4, 210, 5, 6, 7, 8])
        );
        let key32 = [0xabu8; 32];
        assert_eq!(
            backend_one(&backend_key_data(-1, &key32)),
            BackendMessage::BackendKeyData {
                process_id: -1,
                secret_key: key32.to_vec()
            }
        );
        assert_eq!(ready_for_query(b'I'), b"Z\0\0\0\x05I");
        for s in [b'I', b'T', b'E'] {
            assert_eq!(
                backend_one(&ready_for_query(s)),
                BackendMessage::ReadyForQuery { status: s }
            );
        }
        assert!(backend_err(&raw_backend(b'S', b"a\0b\0c"))
            .to_string()
            .contains("1 trailing byte"));
        assert!(backend_err(&raw_backend(b'S', b"a\0b"))
            .to_string()
            .contains("value is not NUL-terminated"));
        assert!(backend_err(&ready_for_query(b'X'))
            .to_string()
            .contains("'X'"));
        assert!(backend_err(&raw_backend(b'K', &[0, 0, 0, 1, 2, 3]))
            .to_string()
            .contains("2 bytes"));
    }

    #[test]
    fn error_and_notice_responses() {
        let bytes = error_response(
            "FATAL",
            "28P01",
            "password authentication failed for user \"app\"",
            Some("detail"),
            Some("hint"),
        );
        let mut body = Vec::new();
        body.extend_from_slice(b"SFATAL\0VFATAL\0C28P01\0");
        body.extend_from_slice(b"Mpassword authentication failed for user \"app\"\0");
        body.extend_from_slice(b"Ddetail\0Hhint\0\0");
        assert_eq!(bytes, raw_backend(b'E', &body));
        let BackendMessage::ErrorResponse(e) = backend_one(&bytes) else {
            panic!("not an error")
        };
        assert_eq!(e.code(), Some("28P01"));
        assert_eq!(
            e.message(),
            Some("password authentication failed for user \"app\"")
        );
        assert_eq!(e.severity(), Some("FATAL"));
        assert_eq!(e.get(b'D'), Some("detail"));
        assert_eq!(e.get(b'H'), Some("hint"));
        assert_eq!(e.get(b'P'), None);
        assert_eq!(e.encode(), bytes);
        assert_eq!(
            e.to_string(),
            "FATAL 28P01: password authentication failed for user \"app\""
        );

        let bytes = notice_response("WARNING", "01000", "careful\0ignored", None, None);
        let BackendMessage::NoticeResponse(n) = backend_one(&bytes) else {
            panic!("not a notice")
        };
        assert_eq!(n.message(), Some("careful"));
        assert_eq!(n.get(b'D'), None);
        assert_eq!(n.encode_as(b'N'), bytes);

        // A server message in another encoding keeps the error readable.
        let BackendMessage::ErrorResponse(e) =
            backend_one(&raw_backend(b'E', b"C3D000\0Mbase \xe9\0\0"))
        else {
            panic!("not an error")
        };
        assert_eq!(e.message(), Some("base \u{fffd}"));
        assert!(backend_err(&raw_backend(b'E', b"C3D000\0"))
            .to_string()
            .contains("not terminated"));
        assert!(backend_err(&raw_backend(b'E', b"C3D000"))
            .to_string()
            .contains("NUL-terminated"));
        assert!(backend_err(&raw_backend(b'N', b"\0x"))
            .to_string()
            .contains("trailing"));
    }

    #[test]
    fn negotiate_and_other_messages() {
        let mut body = 0i32.to_be_bytes().to_vec();
        body.extend_from_slice(&1i32.to_be_bytes());
        body.extend_from_slice(b"_pq_.x\0");
        assert_eq!(
            backend_one(&raw_backend(b'v', &body)),
            BackendMessage::NegotiateProtocolVersion {
                newest_minor: 0,
                unrecognized: vec!["_pq_.x".into()]
            }
        );
        let m = backend_one(&raw_backend(b'C', b"SELECT 1\0"));
        assert_eq!(
            m,
            BackendMessage::Other {
                tag: b'C',
                body: b"SELECT 1\0".to_vec()
            }
        );
        assert_eq!(m.describe(), "CommandComplete ('C', 9 bytes)");
        assert_eq!(
            backend_one(&raw_backend(b'I', b"")),
            BackendMessage::Other {
                tag: b'I',
                body: vec![]
            }
        );
    }

    #[test]
    fn backend_truncations_need_more_and_the_guard_is_early() {
        let stream: Vec<Vec<u8>> = vec![
            authentication_ok(),
            parameter_status("a", "b"),
            backend_key_data(1, &[1, 2, 3, 4]),
            error_response("FATAL", "XX000", "m", None, None),
            ready_for_query(b'I'),
        ];
        for msg in &stream {
            for cut in 0..msg.len() {
                assert_eq!(parse_backend(&msg[..cut]), Ok(None));
            }
        }
        let all: Vec<u8> = stream.concat();
        let mut at = 0;
        let mut n = 0;
        while let Ok(Some((_, used))) = parse_backend(&all[at..]) {
            at += used;
            n += 1;
        }
        assert_eq!((n, at), (5, all.len()));

        let limit = 1 << 20;
        let header = |len: u32| {
            let mut h = vec![b'D'];
            h.extend_from_slice(&len.to_be_bytes());
            h
        };
        assert_eq!(parse_backend(&header(limit - 1)), Ok(None));
        assert_eq!(
            backend_err(&header(limit)),
            ProtocolError::MessageTooLong {
                tag: 'D',
                len: limit,
                max: MAX_BACKEND_LEN
            }
        );
        assert_eq!(
            backend_err(&header(limit)).to_string(),
            "message 'D' length 1048576 exceeds the 1048576-byte limit"
        );
        assert!(matches!(
            parse_backend_limited(&authentication_ok(), 8),
            Err(ProtocolError::MessageTooLong { .. })
        ));
        assert!(matches!(
            parse_backend_limited(&authentication_ok(), 9),
            Ok(Some(_))
        ));
    }

    #[test]
    fn frontend_messages_exact_bytes() {
        let mut pw = b"secret".to_vec();
        pw.push(0);
        assert_eq!(&password_message(&pw)[..], b"p\0\0\0\x0bsecret\0");
        assert_eq!(
            sasl_initial_response("SCRAM-SHA-256", b"n,,n=,r=abc"),
            b"p\0\0\0\x21SCRAM-SHA-256\0\0\0\0\x0bn,,n=,r=abc"
        );
        assert_eq!(sasl_response(b"c=biws"), b"p\0\0\0\x0ac=biws");
    }

    /// xorshift64*: a tiny deterministic generator for the property loops.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }
        fn below(&mut self, n: usize) -> usize {
            (self.next() % n as u64) as usize
        }
    }

    /// Checks the contract on one input: no panic (implicit), and a parsed
    /// packet's size is within the buffer.
    fn check_startup(buf: &[u8]) {
        if let Ok(Some((_, n))) = parse_startup(buf) {
            assert!((8..=buf.len()).contains(&n));
        }
    }

    fn check_backend(buf: &[u8]) {
        if let Ok(Some((_, n))) = parse_backend(buf) {
            assert!((5..=buf.len()).contains(&n));
        }
    }

    /// Whether a (mutated) seed starts like a typed message: startup
    /// packets begin with a zero length byte, typed messages with a letter.
    fn seeds_backend(b: &[u8]) -> bool {
        b.first().is_some_and(|&t| t != 0)
    }

    #[test]
    fn random_bytes_never_panic() {
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        let seeds: Vec<Vec<u8>> = vec![
            startup_bytes(&[("user", "app"), ("database", "d")]),
            cancel_request(5, &[1, 2, 3, 4]),
            ssl_request(),
            error_response("FATAL", "28P01", "no", Some("d"), None),
            backend_key_data(1, &[0; 8]),
            raw_backend(b'R', &[0, 0, 0, 10, b'S', b'C', 0, 0]),
            raw_backend(b'R', &[0, 0, 0, 5, 1, 2, 3, 4]),
            raw_backend(b'S', b"a\0b\0"),
            ready_for_query(b'I'),
            raw_backend(b'v', &[0, 0, 0, 0, 0, 0, 0, 2, b'a', 0, b'b', 0]),
        ];
        let mut parsed = 0;
        for i in 0..10_000 {
            let buf: Vec<u8> = if i % 2 == 0 {
                // Pure noise, with a plausible length prefix half of the time.
                let len = rng.below(64);
                let mut b: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
                if b.len() >= 5 && i % 4 == 0 {
                    let len = b.len() as u32;
                    b[..4].copy_from_slice(&len.to_be_bytes());
                } else if b.len() >= 5 && i % 4 == 2 {
                    let len = b.len() as u32 - 1;
                    b[1..5].copy_from_slice(&len.to_be_bytes());
                    b[0] = [b'R', b'S', b'K', b'Z', b'E', b'N', b'v'][rng.below(7)];
                }
                b
            } else {
                // A valid message with a few bytes flipped, cut or extended.
                let mut b = seeds[rng.below(seeds.len())].clone();
                for _ in 0..=rng.below(3) {
                    let at = rng.below(b.len());
                    b[at] = rng.next() as u8;
                }
                match rng.below(3) {
                    0 => b.truncate(rng.below(b.len() + 1)),
                    1 => b.extend((0..rng.below(8)).map(|_| rng.next() as u8)),
                    _ => {}
                }
                // Half the time, make the length field agree with the new
                // size so the body parsers, not the length checks, see it.
                if b.len() >= 5 && rng.below(2) == 0 {
                    if seeds_backend(&b) {
                        let len = b.len() as u32 - 1;
                        b[1..5].copy_from_slice(&len.to_be_bytes());
                    } else {
                        let len = b.len() as u32;
                        b[..4].copy_from_slice(&len.to_be_bytes());
                    }
                }
                b
            };
            check_startup(&buf);
            check_backend(&buf);
            if matches!(parse_startup(&buf), Ok(Some(_)))
                || matches!(parse_backend(&buf), Ok(Some(_)))
            {
                parsed += 1;
            }
        }
        // The mutations must reach the deeper parsers, not just the length checks.
        assert!(parsed > 100, "only {parsed} inputs parsed");
    }
}
