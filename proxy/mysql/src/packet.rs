//! The parts of the MySQL client/server protocol warden speaks itself: the
//! packet frame, length-encoded integers and strings, the v10 handshake
//! both ways (warden's greeting to clients, the server's to warden), the
//! handshake response both ways, and OK / ERR / auth-switch packets. After
//! login, bytes are relayed and only packet headers are read
//! ([`crate::relay`]).
//!
//! Every parser takes untrusted bytes and returns `Err` on anything short,
//! overlong or inconsistent; none panics.

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Capability flags (the subset warden looks at or sets).
pub mod caps {
    pub const LONG_PASSWORD: u32 = 1;
    pub const CONNECT_WITH_DB: u32 = 1 << 3;
    pub const COMPRESS: u32 = 1 << 5;
    pub const PROTOCOL_41: u32 = 1 << 9;
    pub const SSL: u32 = 1 << 11;
    pub const SECURE_CONNECTION: u32 = 1 << 15;
    pub const PLUGIN_AUTH: u32 = 1 << 19;
    pub const CONNECT_ATTRS: u32 = 1 << 20;
    pub const PLUGIN_AUTH_LENENC_CLIENT_DATA: u32 = 1 << 21;
    pub const DEPRECATE_EOF: u32 = 1 << 24;
    /// MySQL 8: result sets may leave their column definitions out.
    pub const OPTIONAL_RESULTSET_METADATA: u32 = 1 << 25;
    pub const ZSTD_COMPRESSION: u32 = 1 << 26;
    pub const MULTI_FACTOR_AUTH: u32 = 1 << 28;
    pub const SSL_VERIFY_SERVER_CERT: u32 = 1 << 30;
    /// Never offered to clients nor asked of servers: compression (warden
    /// reads packet headers), TLS (offered only where configured), and
    /// MySQL's multi-factor authentication.
    pub const NOT_RELAYED: u32 =
        COMPRESS | SSL | ZSTD_COMPRESSION | MULTI_FACTOR_AUTH | SSL_VERIFY_SERVER_CERT;
    /// MariaDB's extended capability: result-set metadata cached by the
    /// client (a flag byte after every column count, metadata left out for
    /// re-executed statements).
    pub const MARIADB_CACHE_METADATA: u32 = 1 << 4;
    /// MariaDB's extended capability: progress reports (ERR packets with
    /// code 0xffff) before a long command's answer.
    pub const MARIADB_PROGRESS: u32 = 1;
    /// Extended capabilities never relayed: cached metadata (a pooled
    /// connection's server-side cache would not match the next client's).
    pub const MARIADB_NOT_RELAYED: u32 = MARIADB_CACHE_METADATA;
}

/// Largest payload of one packet; a payload this long continues in the next.
pub const MAX_PAYLOAD: usize = 0xff_ffff;

/// Longest handshake packet warden reads (greetings, responses, auth data).
pub const MAX_HANDSHAKE_PACKET: usize = 64 * 1024;

/// Command bytes warden acts on.
pub const COM_QUIT: u8 = 0x01;
pub const COM_CHANGE_USER: u8 = 0x11;
pub const COM_RESET_CONNECTION: u8 = 0x1f;

/// A malformed packet or field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Malformed(pub String);

fn bad<T>(what: impl Into<String>) -> Result<T, Malformed> {
    Err(Malformed(what.into()))
}

/// One packet read whole: sequence id and payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Packet {
    pub seq: u8,
    pub payload: Vec<u8>,
}

/// Appends one packet (payload must be shorter than [`MAX_PAYLOAD`]).
pub fn put_packet(out: &mut Vec<u8>, seq: u8, payload: &[u8]) {
    let len = payload.len().min(MAX_PAYLOAD - 1);
    out.extend_from_slice(&(len as u32).to_le_bytes()[..3]);
    out.push(seq);
    out.extend_from_slice(&payload[..len]);
}

/// Reads one packet of at most `limit` payload bytes (a handshake packet:
/// never continued).
pub async fn read_packet<S: AsyncRead + Unpin>(s: &mut S, limit: usize) -> std::io::Result<Packet> {
    let mut header = [0u8; 4];
    s.read_exact(&mut header).await?;
    let len = u32::from_le_bytes([header[0], header[1], header[2], 0]) as usize;
    if len > limit {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("a {len}-byte packet where at most {limit} bytes are expected"),
        ));
    }
    let mut payload = vec![0u8; len];
    s.read_exact(&mut payload).await?;
    Ok(Packet {
        seq: header[3],
        payload,
    })
}

/// Writes one packet and flushes.
pub async fn write_packet<S: AsyncWrite + Unpin>(
    s: &mut S,
    seq: u8,
    payload: &[u8],
) -> std::io::Result<()> {
    let mut out = zeroize::Zeroizing::new(Vec::with_capacity(payload.len() + 4));
    put_packet(&mut out, seq, payload);
    s.write_all(&out).await?;
    s.flush().await
}

/// A cursor over a payload.
pub struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    pub fn new(buf: &'a [u8]) -> Reader<'a> {
        Reader { buf, pos: 0 }
    }
    pub fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }
    pub fn take(&mut self, n: usize) -> Result<&'a [u8], Malformed> {
        if self.remaining() < n {
            return bad(format!(
                "{n} bytes expected at offset {}, {} left",
                self.pos,
                self.remaining()
            ));
        }
        let s = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }
    pub fn u8(&mut self) -> Result<u8, Malformed> {
        Ok(self.take(1)?[0])
    }
    pub fn u16(&mut self) -> Result<u16, Malformed> {
        let b = self.take(2)?;
        Ok(u16::from_le_bytes([b[0], b[1]]))
    }
    pub fn u32(&mut self) -> Result<u32, Malformed> {
        let b = self.take(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }
    /// Bytes up to a NUL (consumed, not returned).
    pub fn nul_str(&mut self) -> Result<&'a [u8], Malformed> {
        let rest = &self.buf[self.pos..];
        match rest.iter().position(|&b| b == 0) {
            Some(i) => {
                self.pos += i + 1;
                Ok(&rest[..i])
            }
            None => bad("a string without its terminating NUL"),
        }
    }
    /// A NUL-terminated string, or the rest if the NUL is missing (some
    /// servers and clients omit the last one).
    pub fn nul_str_or_rest(&mut self) -> &'a [u8] {
        let rest = &self.buf[self.pos..];
        match rest.iter().position(|&b| b == 0) {
            Some(i) => {
                self.pos += i + 1;
                &rest[..i]
            }
            None => {
                self.pos = self.buf.len();
                rest
            }
        }
    }
    pub fn lenenc_int(&mut self) -> Result<u64, Malformed> {
        match self.u8()? {
            n @ 0..=0xfa => Ok(n as u64),
            0xfc => Ok(self.u16()? as u64),
            0xfd => {
                let b = self.take(3)?;
                Ok(u32::from_le_bytes([b[0], b[1], b[2], 0]) as u64)
            }
            0xfe => {
                let b = self.take(8)?;
                let mut a = [0u8; 8];
                a.copy_from_slice(b);
                Ok(u64::from_le_bytes(a))
            }
            b => bad(format!("0x{b:02x} does not start a length-encoded integer")),
        }
    }
    pub fn lenenc_bytes(&mut self) -> Result<&'a [u8], Malformed> {
        let n = self.lenenc_int()?;
        if n > self.remaining() as u64 {
            return bad(format!(
                "a {n}-byte string where {} bytes are left",
                self.remaining()
            ));
        }
        self.take(n as usize)
    }
    pub fn rest(&mut self) -> &'a [u8] {
        let r = &self.buf[self.pos..];
        self.pos = self.buf.len();
        r
    }
}

pub fn put_lenenc_int(out: &mut Vec<u8>, n: u64) {
    match n {
        0..=0xfa => out.push(n as u8),
        0xfb..=0xffff => {
            out.push(0xfc);
            out.extend_from_slice(&(n as u16).to_le_bytes());
        }
        0x1_0000..=0xff_ffff => {
            out.push(0xfd);
            out.extend_from_slice(&(n as u32).to_le_bytes()[..3]);
        }
        _ => {
            out.push(0xfe);
            out.extend_from_slice(&n.to_le_bytes());
        }
    }
}

pub fn put_lenenc_bytes(out: &mut Vec<u8>, b: &[u8]) {
    put_lenenc_int(out, b.len() as u64);
    out.extend_from_slice(b);
}

/// The v10 initial handshake (a server's greeting).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Greeting {
    pub server_version: Vec<u8>,
    pub connection_id: u32,
    /// Scramble / nonce (both parts, without the trailing NUL).
    pub scramble: Vec<u8>,
    pub capabilities: u32,
    /// MariaDB's extended capabilities (0 for MySQL).
    pub mariadb_caps: u32,
    pub charset: u8,
    pub status: u16,
    pub auth_plugin: Vec<u8>,
}

impl Greeting {
    pub fn parse(p: &[u8]) -> Result<Greeting, Malformed> {
        let mut r = Reader::new(p);
        match r.u8()? {
            10 => {}
            0xff => return bad("the server answered with an error instead of a greeting"),
            v => return bad(format!("protocol version {v} (warden speaks 10)")),
        }
        let server_version = r.nul_str()?.to_vec();
        let connection_id = r.u32()?;
        let mut scramble = r.take(8)?.to_vec();
        r.u8()?;
        let mut capabilities = r.u16()? as u32;
        let mut charset = 0x21;
        let mut status = 0;
        let mut mariadb_caps = 0;
        let mut auth_plugin = Vec::new();
        if r.remaining() > 0 {
            charset = r.u8()?;
            status = r.u16()?;
            capabilities |= (r.u16()? as u32) << 16;
            let data_len = r.u8()? as usize;
            let reserved = r.take(10)?;
            if capabilities & caps::LONG_PASSWORD == 0 {
                mariadb_caps =
                    u32::from_le_bytes([reserved[6], reserved[7], reserved[8], reserved[9]]);
            }
            if capabilities & caps::SECURE_CONNECTION != 0 {
                let n = data_len.saturating_sub(8).max(13);
                let part2 = r.take(n.min(r.remaining()))?;
                let part2 = part2.strip_suffix(&[0]).unwrap_or(part2);
                scramble.extend_from_slice(part2);
            }
            if capabilities & caps::PLUGIN_AUTH != 0 {
                auth_plugin = r.nul_str_or_rest().to_vec();
            }
        }
        if capabilities & caps::PROTOCOL_41 == 0 {
            return bad("the server does not speak protocol 4.1 (CLIENT_PROTOCOL_41)");
        }
        Ok(Greeting {
            server_version,
            connection_id,
            scramble,
            capabilities,
            mariadb_caps,
            charset,
            status,
            auth_plugin,
        })
    }

    /// The payload (scramble must be 20 bytes).
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(128);
        out.push(10);
        out.extend_from_slice(&self.server_version);
        out.push(0);
        out.extend_from_slice(&self.connection_id.to_le_bytes());
        let (p1, p2) = self.scramble.split_at(self.scramble.len().min(8));
        out.extend_from_slice(p1);
        out.extend_from_slice(&[0u8; 8][..8 - p1.len()]);
        out.push(0);
        out.extend_from_slice(&(self.capabilities as u16).to_le_bytes());
        out.push(self.charset);
        out.extend_from_slice(&self.status.to_le_bytes());
        out.extend_from_slice(&((self.capabilities >> 16) as u16).to_le_bytes());
        out.push(if self.capabilities & caps::PLUGIN_AUTH != 0 {
            (self.scramble.len() + 1) as u8
        } else {
            0
        });
        out.extend_from_slice(&[0u8; 6]);
        if self.capabilities & caps::LONG_PASSWORD == 0 {
            out.extend_from_slice(&self.mariadb_caps.to_le_bytes());
        } else {
            out.extend_from_slice(&[0u8; 4]);
        }
        if self.capabilities & caps::SECURE_CONNECTION != 0 {
            out.extend_from_slice(p2);
            out.extend_from_slice(&[0u8; 13][..13usize.saturating_sub(p2.len())]);
        }
        if self.capabilities & caps::PLUGIN_AUTH != 0 {
            out.extend_from_slice(&self.auth_plugin);
            out.push(0);
        }
        out
    }
}

/// A client's handshake response (or, with only the fixed part, an
/// SSLRequest).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct HandshakeResponse {
    pub capabilities: u32,
    pub max_packet: u32,
    pub charset: u8,
    pub mariadb_caps: u32,
    pub user: Vec<u8>,
    /// The password proof (a client's is ignored; warden's own is wiped
    /// when dropped).
    pub auth_response: zeroize::Zeroizing<Vec<u8>>,
    pub database: Option<Vec<u8>>,
    pub auth_plugin: Option<Vec<u8>>,
    /// The connection attributes block, as sent (lenenc pairs).
    pub attrs: Option<Vec<u8>>,
}

/// Length of the fixed part (and of a whole SSLRequest).
pub const SSL_REQUEST_LEN: usize = 32;

impl HandshakeResponse {
    /// Parses a response; `Ok(None)` for an SSLRequest (fixed part only,
    /// CLIENT_SSL set).
    pub fn parse(p: &[u8]) -> Result<Option<HandshakeResponse>, Malformed> {
        let mut r = Reader::new(p);
        let capabilities = r.u32()?;
        if capabilities & caps::PROTOCOL_41 == 0 {
            return bad("the client does not speak protocol 4.1 (CLIENT_PROTOCOL_41)");
        }
        let max_packet = r.u32()?;
        let charset = r.u8()?;
        let filler = r.take(23)?;
        let mariadb_caps = if capabilities & caps::LONG_PASSWORD == 0 {
            u32::from_le_bytes([filler[19], filler[20], filler[21], filler[22]])
        } else {
            0
        };
        if r.remaining() == 0 && capabilities & caps::SSL != 0 {
            return Ok(None);
        }
        let user = r.nul_str()?.to_vec();
        let auth_response = zeroize::Zeroizing::new(
            if capabilities & caps::PLUGIN_AUTH_LENENC_CLIENT_DATA != 0 {
                r.lenenc_bytes()?.to_vec()
            } else if capabilities & caps::SECURE_CONNECTION != 0 {
                let n = r.u8()? as usize;
                r.take(n)?.to_vec()
            } else {
                r.nul_str()?.to_vec()
            },
        );
        let mut database = None;
        if capabilities & caps::CONNECT_WITH_DB != 0 && r.remaining() > 0 {
            database = Some(r.nul_str_or_rest().to_vec());
        }
        let mut auth_plugin = None;
        if capabilities & caps::PLUGIN_AUTH != 0 && r.remaining() > 0 {
            auth_plugin = Some(r.nul_str_or_rest().to_vec());
        }
        let mut attrs = None;
        if capabilities & caps::CONNECT_ATTRS != 0 && r.remaining() > 0 {
            let block = r.lenenc_bytes()?;
            // Every pair must parse: the block is forwarded upstream.
            let mut a = Reader::new(block);
            while a.remaining() > 0 {
                a.lenenc_bytes()?;
                a.lenenc_bytes()?;
            }
            attrs = Some(block.to_vec());
        }
        Ok(Some(HandshakeResponse {
            capabilities,
            max_packet,
            charset,
            mariadb_caps,
            user,
            auth_response,
            database,
            auth_plugin,
            attrs,
        }))
    }

    fn put_fixed(&self, out: &mut Vec<u8>, capabilities: u32) {
        out.extend_from_slice(&capabilities.to_le_bytes());
        out.extend_from_slice(&self.max_packet.to_le_bytes());
        out.push(self.charset);
        out.extend_from_slice(&[0u8; 19]);
        if capabilities & caps::LONG_PASSWORD == 0 {
            out.extend_from_slice(&self.mariadb_caps.to_le_bytes());
        } else {
            out.extend_from_slice(&[0u8; 4]);
        }
    }

    /// The SSLRequest payload for these capabilities (CLIENT_SSL added).
    pub fn encode_ssl_request(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(SSL_REQUEST_LEN);
        self.put_fixed(&mut out, self.capabilities | caps::SSL);
        out
    }

    /// The full payload (zeroized on drop: it carries the password proof).
    pub fn encode(&self) -> zeroize::Zeroizing<Vec<u8>> {
        let mut out = zeroize::Zeroizing::new(Vec::with_capacity(128 + self.auth_response.len()));
        let c = self.capabilities;
        self.put_fixed(&mut out, c);
        out.extend_from_slice(&self.user);
        out.push(0);
        if c & caps::PLUGIN_AUTH_LENENC_CLIENT_DATA != 0 {
            put_lenenc_bytes(&mut out, &self.auth_response);
        } else {
            out.push(self.auth_response.len().min(255) as u8);
            out.extend_from_slice(&self.auth_response[..self.auth_response.len().min(255)]);
        }
        if c & caps::CONNECT_WITH_DB != 0 {
            out.extend_from_slice(self.database.as_deref().unwrap_or_default());
            out.push(0);
        }
        if c & caps::PLUGIN_AUTH != 0 {
            out.extend_from_slice(self.auth_plugin.as_deref().unwrap_or_default());
            out.push(0);
        }
        if c & caps::CONNECT_ATTRS != 0 {
            put_lenenc_bytes(&mut out, self.attrs.as_deref().unwrap_or_default());
        }
        out
    }
}

/// An ERR packet's fields.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ErrPacket {
    pub code: u16,
    pub sqlstate: [u8; 5],
    pub message: String,
}

impl ErrPacket {
    pub fn new(code: u16, sqlstate: &str, message: impl Into<String>) -> ErrPacket {
        let mut s = *b"HY000";
        if sqlstate.len() == 5 {
            s.copy_from_slice(sqlstate.as_bytes());
        }
        ErrPacket {
            code,
            sqlstate: s,
            message: message.into(),
        }
    }

    pub fn parse(p: &[u8]) -> Result<ErrPacket, Malformed> {
        let mut r = Reader::new(p);
        if r.u8()? != 0xff {
            return bad("not an ERR packet");
        }
        let code = r.u16()?;
        let mut sqlstate = *b"HY000";
        let rest = r.rest();
        let message = if rest.first() == Some(&b'#') && rest.len() >= 6 {
            sqlstate.copy_from_slice(&rest[1..6]);
            &rest[6..]
        } else {
            rest
        };
        Ok(ErrPacket {
            code,
            sqlstate,
            message: String::from_utf8_lossy(message).into_owned(),
        })
    }

    /// The payload, with the SQLSTATE marker (every client warden serves
    /// speaks protocol 4.1).
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(9 + self.message.len());
        out.push(0xff);
        out.extend_from_slice(&self.code.to_le_bytes());
        out.push(b'#');
        out.extend_from_slice(&self.sqlstate);
        // MySQL's limit on an error message (MYSQL_ERRMSG_SIZE).
        let mut end = self.message.len().min(511);
        while !self.message.is_char_boundary(end) {
            end -= 1;
        }
        out.extend_from_slice(&self.message.as_bytes()[..end]);
        out
    }

    pub fn sqlstate_str(&self) -> String {
        String::from_utf8_lossy(&self.sqlstate).into_owned()
    }
}

/// An OK packet after login: no rows, no insert id, the given status.
pub fn ok_packet(status: u16) -> Vec<u8> {
    let mut out = vec![0x00, 0, 0];
    out.extend_from_slice(&status.to_le_bytes());
    out.extend_from_slice(&[0, 0]);
    out
}

/// An AuthSwitchRequest payload.
pub fn auth_switch(plugin: &[u8], data: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(2 + plugin.len() + data.len() + 1);
    out.push(0xfe);
    out.extend_from_slice(plugin);
    out.push(0);
    out.extend_from_slice(data);
    out.push(0);
    out
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn greeting() -> Greeting {
        Greeting {
            server_version: b"5.5.5-10.11.19-MariaDB".to_vec(),
            connection_id: 42,
            scramble: (1..=20).collect(),
            capabilities: 0xf7fe
                | caps::PLUGIN_AUTH
                | caps::CONNECT_ATTRS
                | caps::PLUGIN_AUTH_LENENC_CLIENT_DATA,
            mariadb_caps: 0x1d,
            charset: 45,
            status: 2,
            auth_plugin: b"mysql_native_password".to_vec(),
        }
    }

    #[test]
    fn a_greeting_round_trips() {
        let g = greeting();
        assert_eq!(Greeting::parse(&g.encode()).unwrap(), g);
    }

    #[test]
    fn a_handshake_response_round_trips_and_an_ssl_request_is_recognised() {
        let mut attrs = Vec::new();
        put_lenenc_bytes(&mut attrs, b"_client_name");
        put_lenenc_bytes(&mut attrs, b"libmariadb");
        let h = HandshakeResponse {
            capabilities: caps::PROTOCOL_41
                | caps::SECURE_CONNECTION
                | caps::PLUGIN_AUTH
                | caps::PLUGIN_AUTH_LENENC_CLIENT_DATA
                | caps::CONNECT_WITH_DB
                | caps::CONNECT_ATTRS,
            max_packet: 1 << 24,
            charset: 33,
            mariadb_caps: 7,
            user: b"app".to_vec(),
            auth_response: zeroize::Zeroizing::new(vec![9; 20]),
            database: Some(b"orders".to_vec()),
            auth_plugin: Some(b"mysql_native_password".to_vec()),
            attrs: Some(attrs),
        };
        let enc = h.encode();
        assert_eq!(HandshakeResponse::parse(&enc).unwrap().unwrap(), h);
        let ssl = h.encode_ssl_request();
        assert_eq!(ssl.len(), SSL_REQUEST_LEN);
        assert_eq!(HandshakeResponse::parse(&ssl).unwrap(), None);
    }

    #[test]
    fn truncated_and_garbage_input_is_an_error_not_a_panic() {
        let g = greeting().encode();
        for n in 0..g.len() {
            let _ = Greeting::parse(&g[..n]);
        }
        let mut h = HandshakeResponse {
            capabilities: caps::PROTOCOL_41
                | caps::CONNECT_ATTRS
                | caps::PLUGIN_AUTH_LENENC_CLIENT_DATA,
            user: b"u".to_vec(),
            attrs: Some(vec![]),
            ..Default::default()
        }
        .encode()
        .to_vec();
        for n in 0..h.len() {
            let _ = HandshakeResponse::parse(&h[..n]);
        }
        // A length-encoded auth response longer than the packet.
        h[34] = 0xfe;
        assert!(HandshakeResponse::parse(&h).is_err());
        // Pseudo-random bytes.
        let mut x: u32 = 12345;
        for len in 0..300 {
            let buf: Vec<u8> = (0..len)
                .map(|_| {
                    x = x.wrapping_mul(1_103_515_245).wrapping_add(12345);
                    (x >> 16) as u8
                })
                .collect();
            let _ = HandshakeResponse::parse(&buf);
            let _ = Greeting::parse(&buf);
            let _ = ErrPacket::parse(&buf);
        }
        assert!(HandshakeResponse::parse(&[0u8; 40]).is_err());
    }

    #[test]
    fn err_packets_carry_code_and_sqlstate() {
        let e = ErrPacket::new(1045, "28000", "Access denied");
        let enc = e.encode();
        assert_eq!(&enc[..9], b"\xff\x15\x04#28000");
        assert_eq!(ErrPacket::parse(&enc).unwrap(), e);
        let long = ErrPacket::new(1045, "28000", "é".repeat(400)).encode();
        assert!(long.len() <= 9 + 511);
        assert!(std::str::from_utf8(&long[9..]).is_ok());
    }

    #[test]
    fn lenenc_integers_round_trip() {
        for n in [
            0u64,
            250,
            251,
            0xffff,
            0x1_0000,
            0xff_ffff,
            0x100_0000,
            u64::MAX,
        ] {
            let mut out = Vec::new();
            put_lenenc_int(&mut out, n);
            assert_eq!(Reader::new(&out).lenenc_int().unwrap(), n);
        }
    }
}
