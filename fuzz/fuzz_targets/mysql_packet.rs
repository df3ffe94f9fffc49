//! The MySQL/MariaDB handshake codec of the MySQL front end
//! (`warden_mysql::packet`): a server's greeting, a client's handshake
//! response (or SSLRequest), ERR packets and length-encoded fields.
//!
//! Properties: never a panic, a rejection is a typed `Malformed` with a
//! message; what parses re-encodes to bytes that parse to the same value
//! (within the shapes warden itself sends); a length-encoded integer
//! round-trips for every value; no field read past its packet.
#![no_main]

use libfuzzer_sys::fuzz_target;
use warden_mysql::packet::{
    caps, put_lenenc_bytes, put_lenenc_int, put_packet, ErrPacket, Greeting, HandshakeResponse,
    Reader,
};

fn greeting(p: &[u8]) {
    let g = match Greeting::parse(p) {
        Ok(g) => g,
        Err(e) => {
            assert!(!e.0.is_empty());
            return;
        }
    };
    assert!(g.capabilities & caps::PROTOCOL_41 != 0);
    assert!(!g.server_version.contains(&0));
    // The shape warden's tests and real servers use: a 20-byte scramble
    // sent in two parts, the plugin named.
    let wanted = caps::SECURE_CONNECTION | caps::PLUGIN_AUTH;
    if g.scramble.len() == 20 && g.capabilities & wanted == wanted && !g.auth_plugin.contains(&0) {
        let again = Greeting::parse(&g.encode()).expect("a re-encoded greeting parses");
        assert_eq!(again, g);
    }
}

fn handshake_response(p: &[u8]) {
    let r = match HandshakeResponse::parse(p) {
        Ok(Some(r)) => r,
        Ok(None) => {
            // An SSLRequest: the fixed part only, CLIENT_SSL set.
            assert!(p.len() >= 32);
            return;
        }
        Err(e) => {
            assert!(!e.0.is_empty());
            return;
        }
    };
    assert!(!r.user.contains(&0));
    let c = r.capabilities;
    let lenenc = c & caps::PLUGIN_AUTH_LENENC_CLIENT_DATA != 0;
    let short = c & caps::SECURE_CONNECTION != 0 && r.auth_response.len() <= 255;
    let present = |flag: u32, field: bool| (c & flag != 0) == field;
    if (lenenc || short)
        && present(caps::CONNECT_WITH_DB, r.database.is_some())
        && present(caps::PLUGIN_AUTH, r.auth_plugin.is_some())
        && present(caps::CONNECT_ATTRS, r.attrs.is_some())
    {
        let encoded = r.encode();
        let again = HandshakeResponse::parse(&encoded)
            .expect("a re-encoded response parses")
            .expect("a full response, not an SSLRequest");
        assert_eq!(again, r);
    }
    // The SSLRequest built from it is recognised as one.
    let ssl = r.encode_ssl_request();
    assert_eq!(ssl.len(), 32);
    assert_eq!(HandshakeResponse::parse(&ssl), Ok(None));
}

fn err_packet(p: &[u8]) {
    match ErrPacket::parse(p) {
        Ok(e) => {
            let encoded = e.encode();
            assert!(encoded.len() <= 9 + 511);
            let again = ErrPacket::parse(&encoded).expect("a re-encoded ERR parses");
            assert_eq!(again.code, e.code);
            assert_eq!(again.sqlstate, e.sqlstate);
            assert!(e.message.starts_with(&again.message));
        }
        Err(e) => assert!(!e.0.is_empty()),
    }
}

fn lenenc(p: &[u8]) {
    let mut r = Reader::new(p);
    while r.remaining() > 0 {
        let before = r.remaining();
        match r.lenenc_bytes() {
            Ok(b) => {
                assert!(b.len() < before);
                let mut out = Vec::new();
                put_lenenc_bytes(&mut out, b);
                let mut back = Reader::new(&out);
                assert_eq!(back.lenenc_bytes().ok(), Some(b));
                assert_eq!(back.remaining(), 0);
            }
            Err(e) => {
                assert!(!e.0.is_empty());
                break;
            }
        }
    }
    if p.len() >= 8 {
        let n = u64::from_le_bytes(p[..8].try_into().expect("8 bytes"));
        let mut out = Vec::new();
        put_lenenc_int(&mut out, n);
        assert_eq!(Reader::new(&out).lenenc_int(), Ok(n));
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&which, p)) = data.split_first() else {
        return;
    };
    match which % 4 {
        0 => greeting(p),
        1 => handshake_response(p),
        2 => err_packet(p),
        _ => lenenc(p),
    }
    // Framing: a payload below the limit keeps its length and sequence id.
    let mut framed = Vec::new();
    put_packet(&mut framed, which, p);
    assert_eq!(framed.len(), p.len() + 4);
    assert_eq!(framed[3], which);
});
