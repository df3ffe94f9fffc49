//! The secret store's row decoding (`warden_core::store::SecretStore::get`
//! and `crypto::Key256::open`): what a backend hands back as a sealed row
//! (master-key id, wrapped data key, ciphertext, version number) is opened
//! and checked before any value leaves the store.
//!
//! The harness stores three versions through `SecretStore::put` in an
//! in-memory backend, then applies fuzzer-chosen edits to the stored rows —
//! bit flips, truncations, extensions, raw replacement bytes, a row's key or
//! ciphertext swapped with another row's, a row renumbered, another master
//! key id — and reads every version back.
//!
//! Properties: never a panic; a row identical to the one `put` stored opens
//! to exactly the value stored (round trip); any other row is refused with an
//! `Integrity` error, never a wrong value; an error message is one line and
//! never contains the value; `Key256::open` on any bytes is `TooShort` below
//! nonce + tag, otherwise `Open`, and `seal`/`open` round-trip any
//! plaintext and associated data.
#![no_main]

use libfuzzer_sys::fuzz_target;
use std::sync::{Arc, Mutex};
use warden_core::crypto::{CryptoError, Key256};
use warden_core::error::{Error, ErrorKind, Result};
use warden_core::masterkey::Kek;
use warden_core::store::{
    CommitHook, LeaseRow, NewVersion, RewrapFn, SealedVersion, SecretBackend, SecretStore,
    SecretSummary, VersionInfo, VersionRow,
};
use warden_fuzz::split_input;

const MARK: &[u8] = b"SECRET-MARK:";

#[derive(Clone, PartialEq, Eq)]
struct Row {
    name: String,
    env: String,
    version: u32,
    kek_id: String,
    wrapped_key: Vec<u8>,
    ciphertext: Vec<u8>,
}

/// Rows in memory (shared with the harness, which edits them); only what
/// `SecretStore::put` and `get` use.
struct Memory {
    rows: Arc<Mutex<Vec<Row>>>,
    next: Vec<((String, String), u32)>,
}

fn unused<T>() -> Result<T> {
    Err(Error::internal("not in the fuzz backend"))
}

impl SecretBackend for Memory {
    fn meta_get(&self, _: &str) -> Result<Option<String>> {
        unused()
    }
    fn meta_set(&mut self, _: &str, _: &str) -> Result<()> {
        unused()
    }
    fn meta_list(&self, _: &str) -> Result<Vec<(String, String)>> {
        unused()
    }
    fn put_version(
        &mut self,
        name: &str,
        env: &str,
        _: &str,
        _: u32,
        seal: &mut dyn FnMut(u32) -> Result<SealedVersion>,
        before_commit: CommitHook<'_>,
    ) -> Result<u32> {
        let key = (name.to_string(), env.to_string());
        let version = match self.next.iter_mut().find(|(k, _)| *k == key) {
            Some((_, next)) => {
                *next += 1;
                *next - 1
            }
            None => {
                self.next.push((key, 2));
                1
            }
        };
        let sealed = seal(version)?;
        before_commit(version)?;
        self.rows.lock().expect("rows").push(Row {
            name: name.into(),
            env: env.into(),
            version,
            kek_id: sealed.kek_id,
            wrapped_key: sealed.wrapped_key,
            ciphertext: sealed.ciphertext,
        });
        Ok(version)
    }
    fn get_version(
        &self,
        name: &str,
        env: &str,
        version: Option<u32>,
    ) -> Result<Option<VersionRow>> {
        let rows = self.rows.lock().expect("rows");
        let row = rows
            .iter()
            .filter(|r| r.name == name && r.env == env && version.is_none_or(|v| v == r.version))
            .max_by_key(|r| r.version);
        Ok(row.map(|r| VersionRow {
            version: r.version,
            sealed: SealedVersion {
                kek_id: r.kek_id.clone(),
                wrapped_key: r.wrapped_key.clone(),
                ciphertext: r.ciphertext.clone(),
            },
        }))
    }
    fn list(&self, _: Option<&str>) -> Result<Vec<SecretSummary>> {
        unused()
    }
    fn versions(&self, _: &str, _: &str) -> Result<Vec<VersionInfo>> {
        unused()
    }
    fn remove(&mut self, _: &str, _: &str, _: CommitHook<'_>) -> Result<u32> {
        unused()
    }
    fn rewrap_all(&mut self, _: RewrapFn<'_>, _: &[(&str, String)]) -> Result<u64> {
        unused()
    }
    fn lease_put_many(&mut self, _: &[LeaseRow]) -> Result<()> {
        unused()
    }
    fn lease_delete(&mut self, _: &str) -> Result<()> {
        unused()
    }
    fn lease_list(&self) -> Result<Vec<LeaseRow>> {
        unused()
    }
    fn meta_delete(&mut self, _: &str) -> Result<()> {
        unused()
    }
}

fn check_error(e: &Error, value: &[u8]) {
    assert!(
        !e.message.is_empty() && !e.message.contains('\n'),
        "{}",
        e.message
    );
    let text = e.message.as_bytes();
    assert!(
        !text.windows(MARK.len()).any(|w| w == MARK),
        "value in an error"
    );
    if value.len() >= 16 {
        assert!(!text.windows(value.len()).any(|w| w == value));
    }
}

/// One edit of the stored rows, chosen by `op`.
fn edit(rows: &mut [Row], op: &[u8]) {
    let [kind, r, a, b, rest @ ..] = op else {
        return;
    };
    let n = rows.len();
    let (i, j) = (usize::from(*r) % n, usize::from(*a) % n);
    let at = usize::from(u16::from_be_bytes([*a, *b]));
    let second = kind & 0x80 != 0;
    fn field(row: &mut Row, second: bool) -> &mut Vec<u8> {
        if second {
            &mut row.ciphertext
        } else {
            &mut row.wrapped_key
        }
    }
    match kind % 8 {
        0 => {
            let bytes = field(&mut rows[i], second);
            if !bytes.is_empty() {
                let k = at % bytes.len();
                bytes[k] ^= 1 << (b % 8);
            }
        }
        1 => {
            let bytes = field(&mut rows[i], second);
            let keep = at % (bytes.len() + 1);
            bytes.truncate(keep);
        }
        2 => field(&mut rows[i], second).extend_from_slice(rest),
        3 => *field(&mut rows[i], second) = rest.to_vec(),
        4 => {
            let other = field(&mut rows[j], second).clone();
            *field(&mut rows[i], second) = other;
        }
        5 => rows[i].version = u32::from(*b % 4),
        6 => rows[i].kek_id = String::from_utf8_lossy(rest).into_owned(),
        _ => {
            let (name, env) = (rows[j].name.clone(), rows[j].env.clone());
            rows[i].name = name;
            rows[i].env = env;
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let (cut, bytes) = split_input(data);
    let (secret, edits) = bytes.split_at(cut);
    let key = Key256::from_slice(&[7; 32]).expect("32 bytes");

    // Raw bytes as a sealed record.
    match key.open(edits, secret) {
        Ok(_) => panic!("opened bytes nobody sealed"),
        Err(CryptoError::TooShort(n)) => assert!(n == secret.len() && n < 28),
        Err(CryptoError::Open) => assert!(secret.len() >= 28),
        Err(e) => panic!("unexpected {e}"),
    }
    let sealed = key.seal(edits, secret).expect("seal");
    assert_eq!(sealed.len(), secret.len() + 28);
    assert_eq!(key.open(edits, &sealed).expect("open").as_slice(), secret);

    // Rows stored by the store, then edited.
    let kek = Kek::from_key(key);
    let rows = Arc::new(Mutex::new(Vec::new()));
    let memory = Memory {
        rows: rows.clone(),
        next: Vec::new(),
    };
    let mut store = SecretStore::new(Box::new(memory));
    let values: Vec<Vec<u8>> = (0..3u8)
        .map(|k| {
            let mut v = MARK.to_vec();
            v.extend_from_slice(secret);
            v.push(b'0' + k);
            v
        })
        .collect();
    let names = [
        ("db-password", "prod"),
        ("db-password", "prod"),
        ("api-key", "dev"),
    ];
    for (value, (name, env)) in values.iter().zip(names) {
        let new = NewVersion {
            name,
            env,
            value,
            created_by: "fuzz",
            keep: 5,
        };
        store.put(&kek, new, &mut |_| Ok(())).expect("put");
    }
    // The rows as stored, and each with its value.
    let pristine: Vec<(Row, &Vec<u8>)> = {
        let mut rows = rows.lock().expect("rows");
        let pristine = rows.iter().cloned().zip(&values).collect();
        for op in edits.chunks(9).take(8) {
            edit(&mut rows, op);
        }
        pristine
    };

    let lookups = [
        ("db-password", "prod", Some(1)),
        ("db-password", "prod", Some(2)),
        ("db-password", "prod", None),
        ("api-key", "dev", Some(1)),
        ("api-key", "dev", None),
        ("db-password", "prod", Some(3)),
    ];
    for (name, env, version) in lookups {
        let row = store
            .backend()
            .get_version(name, env, version)
            .expect("memory backend")
            .map(|r| Row {
                name: name.into(),
                env: env.into(),
                version: r.version,
                kek_id: r.sealed.kek_id,
                wrapped_key: r.sealed.wrapped_key,
                ciphertext: r.sealed.ciphertext,
            });
        let genuine = row
            .as_ref()
            .and_then(|row| pristine.iter().find(|(p, _)| p == row).map(|(_, v)| *v));
        match store.get(&kek, name, env, version) {
            Ok((v, value)) => {
                let expected = genuine.expect("only a genuine row opens");
                assert_eq!(Some(v), row.as_ref().map(|r| r.version));
                assert_eq!(value.as_slice(), expected.as_slice());
            }
            Err(e) => {
                check_error(&e, &values[0]);
                match row {
                    None => assert_eq!(e.kind, ErrorKind::NotFound),
                    Some(_) => {
                        assert!(
                            genuine.is_none(),
                            "a genuine row was refused: {}",
                            e.message
                        );
                        assert_eq!(e.kind, ErrorKind::Integrity, "{}", e.message);
                    }
                }
            }
        }
    }
});
