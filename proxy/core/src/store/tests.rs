//! The backend suite: every case runs on SQLite here (one `#[test]` each)
//! and on a real PostgreSQL in `tests/postgres.rs`. A case gets a fresh,
//! empty store and raw access to the database under it (to tamper with rows
//! as an attacker with the database would).

use super::sqlite::SqliteBackend;
use super::*;
use crate::error::ErrorKind;
use crate::masterkey::Kek;

mod postgres;

const DISTINCT: &[u8] = b"pl41ntext-CANARY-7f3e9b-value";

/// Direct access to the database under a store, bypassing warden.
pub(super) trait Raw {
    /// Runs `sql`; `$1`, `$2`… are `params` (byte strings), numbered in the
    /// order they first appear.
    fn exec(&self, sql: &str, params: &[&[u8]]);
    /// The byte-string columns of every row `sql` returns.
    fn rows(&self, sql: &str) -> Vec<Vec<Vec<u8>>>;
    /// Every byte the database keeps (its files, a dump), to look for plaintext.
    fn everything(&self) -> Vec<u8>;
}

/// One case's store and the database under it.
pub(super) struct Case {
    pub store: SecretStore,
    pub raw: Box<dyn Raw>,
    /// Whatever must live as long as the case (a temp dir).
    pub _keep: Box<dyn std::any::Any>,
}

/// The one row `sql` returns.
fn one_row(raw: &dyn Raw, sql: &str) -> Vec<Vec<u8>> {
    let mut rows = raw.rows(sql);
    assert_eq!(rows.len(), 1, "{sql}");
    rows.remove(0)
}

struct SqliteRaw {
    path: std::path::PathBuf,
    dir: std::path::PathBuf,
}

impl Raw for SqliteRaw {
    fn exec(&self, sql: &str, params: &[&[u8]]) {
        rusqlite::Connection::open(&self.path)
            .unwrap()
            .execute(sql, rusqlite::params_from_iter(params.iter()))
            .unwrap();
    }
    fn rows(&self, sql: &str) -> Vec<Vec<Vec<u8>>> {
        let c = rusqlite::Connection::open(&self.path).unwrap();
        let mut stmt = c.prepare(sql).unwrap();
        let n = stmt.column_count();
        stmt.query_map([], |r| (0..n).map(|i| r.get::<_, Vec<u8>>(i)).collect())
            .unwrap()
            .map(|r| r.unwrap())
            .collect()
    }
    fn everything(&self) -> Vec<u8> {
        let mut all = Vec::new();
        for entry in std::fs::read_dir(&self.dir).unwrap() {
            all.extend(std::fs::read(entry.unwrap().path()).unwrap());
        }
        all
    }
}

fn sqlite_case() -> Case {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store.db");
    let store = SecretStore::new(Box::new(SqliteBackend::open(&path).unwrap()));
    Case {
        store,
        raw: Box::new(SqliteRaw {
            path,
            dir: dir.path().to_path_buf(),
        }),
        _keep: Box::new(dir),
    }
}

fn new_kek() -> Kek {
    Kek::from_key(Key256::generate().unwrap())
}

fn put(store: &mut SecretStore, kek: &Kek, name: &str, env: &str, value: &[u8], keep: u32) -> u32 {
    store
        .put(kek, nv(name, env, value, keep), &mut |_| Ok(()))
        .unwrap()
}

fn nv<'a>(name: &'a str, env: &'a str, value: &'a [u8], keep: u32) -> NewVersion<'a> {
    NewVersion {
        name,
        env,
        value,
        created_by: "test",
        keep,
    }
}

/// Whether `haystack` holds `value` as is or hex-encoded (how a dump shows bytea).
pub(super) fn holds(haystack: &[u8], value: &[u8]) -> bool {
    let hex = hex::encode(value).into_bytes();
    [value, hex.as_slice()]
        .iter()
        .any(|needle| haystack.windows(needle.len()).any(|w| w == *needle))
}

/// Declares the suite: a `#[test]` per case on SQLite, and [`CASES`] for
/// other backends.
macro_rules! suite {
    ($($case:ident),+ $(,)?) => {
        /// Every case of the suite, by name.
        pub(super) const CASES: &[(&str, fn(Case))] = &[$((stringify!($case), $case)),+];
        mod on_sqlite {
            $(#[test] fn $case() { super::$case(super::sqlite_case()) })+
        }
    };
}

suite!(
    values_roundtrip_by_env_and_version,
    old_versions_are_pruned_and_numbers_never_repeat,
    store_holds_no_plaintext,
    swapped_rows_give_integrity_errors_not_wrong_values,
    version_renumbering_is_detected,
    every_flipped_byte_is_detected,
    wrong_kek_is_refused,
    rewrap_changes_kek_and_keeps_values,
    failing_commit_hook_rolls_back,
    meta_and_lease_rows_roundtrip,
);

fn values_roundtrip_by_env_and_version(c: Case) {
    let (mut store, kek) = (c.store, new_kek());
    assert_eq!(put(&mut store, &kek, "orders-db/app", "prod", b"p1", 10), 1);
    assert_eq!(put(&mut store, &kek, "orders-db/app", "prod", b"p2", 10), 2);
    assert_eq!(put(&mut store, &kek, "orders-db/app", "dev", b"d1", 10), 1);
    let (v, val) = store.get(&kek, "orders-db/app", "prod", None).unwrap();
    assert_eq!((v, val.as_slice()), (2, &b"p2"[..]));
    let (_, val) = store.get(&kek, "orders-db/app", "prod", Some(1)).unwrap();
    assert_eq!(val.as_slice(), b"p1");
    let (_, val) = store.get(&kek, "orders-db/app", "dev", None).unwrap();
    assert_eq!(val.as_slice(), b"d1");
    let e = store
        .get(&kek, "orders-db/app", "staging", None)
        .unwrap_err();
    assert_eq!(e.kind, ErrorKind::NotFound);
}

fn old_versions_are_pruned_and_numbers_never_repeat(c: Case) {
    let (mut store, kek) = (c.store, new_kek());
    for i in 1..=5u8 {
        put(&mut store, &kek, "a", "prod", &[i], 3);
    }
    let versions: Vec<u32> = store
        .backend()
        .versions("a", "prod")
        .unwrap()
        .iter()
        .map(|v| v.version)
        .collect();
    assert_eq!(versions, vec![3, 4, 5]);
    let removed = store
        .backend_mut()
        .remove("a", "prod", &mut |_| Ok(()))
        .unwrap();
    assert_eq!(removed, 3);
    assert!(store.backend().list(None).unwrap().is_empty());
    assert_eq!(put(&mut store, &kek, "a", "prod", b"again", 3), 6);
}

fn store_holds_no_plaintext(c: Case) {
    let (mut store, kek) = (c.store, new_kek());
    put(&mut store, &kek, "canary/secret", "prod", DISTINCT, 10);
    put(
        &mut store,
        &kek,
        "canary/secret",
        "prod",
        b"second-CANARY-value-91c2",
        10,
    );
    drop(store);
    let all = c.raw.everything();
    assert!(!all.is_empty());
    for value in [DISTINCT, b"second-CANARY-value-91c2"] {
        assert!(!holds(&all, value), "plaintext found in the database");
    }
}

fn swapped_rows_give_integrity_errors_not_wrong_values(c: Case) {
    let kek = new_kek();
    let mut store = c.store;
    put(&mut store, &kek, "a", "prod", b"value-a", 10);
    put(&mut store, &kek, "b", "prod", b"value-b", 10);
    let sel =
        |n: &str| format!("SELECT wrapped_key, ciphertext FROM secret_versions WHERE name='{n}'");
    let (a, b) = (one_row(&*c.raw, &sel("a")), one_row(&*c.raw, &sel("b")));
    let set = |n: &str| {
        format!("UPDATE secret_versions SET wrapped_key=$1, ciphertext=$2 WHERE name='{n}'")
    };
    // Whole rows swapped.
    c.raw.exec(&set("a"), &[&b[0], &b[1]]);
    c.raw.exec(&set("b"), &[&a[0], &a[1]]);
    for name in ["a", "b"] {
        let e = store.get(&kek, name, "prod", None).unwrap_err();
        assert_eq!(e.kind, ErrorKind::Integrity, "{e}");
        assert!(e.message.contains(&format!("{name:?}")), "{e}");
    }
    // Only the ciphertexts swapped (wrapped keys back in place).
    c.raw.exec(&set("a"), &[&a[0], &b[1]]);
    let e = store.get(&kek, "a", "prod", None).unwrap_err();
    assert_eq!(e.kind, ErrorKind::Integrity);
    assert!(e.message.contains("ciphertext"), "{e}");
}

fn version_renumbering_is_detected(c: Case) {
    let kek = new_kek();
    let mut store = c.store;
    put(&mut store, &kek, "a", "prod", b"old", 10);
    put(&mut store, &kek, "a", "prod", b"new", 10);
    // An attacker deletes v2 and renumbers v1 as v2 to roll the secret back.
    c.raw
        .exec("DELETE FROM secret_versions WHERE version = 2", &[]);
    c.raw.exec(
        "UPDATE secret_versions SET version = 2 WHERE version = 1",
        &[],
    );
    assert_eq!(
        store.get(&kek, "a", "prod", None).unwrap_err().kind,
        ErrorKind::Integrity
    );
}

fn every_flipped_byte_is_detected(c: Case) {
    let kek = new_kek();
    let mut store = c.store;
    put(&mut store, &kek, "a", "prod", b"flip-me", 10);
    for col in ["wrapped_key", "ciphertext"] {
        let orig = one_row(&*c.raw, &format!("SELECT {col} FROM secret_versions")).remove(0);
        let set = format!("UPDATE secret_versions SET {col} = $1");
        for i in 0..orig.len() {
            let mut t = orig.clone();
            t[i] ^= 0x80;
            c.raw.exec(&set, &[&t]);
            let e = store.get(&kek, "a", "prod", None).unwrap_err();
            assert_eq!(e.kind, ErrorKind::Integrity, "{col} byte {i}: {e}");
        }
        c.raw.exec(&set, &[&orig]);
    }
    assert_eq!(
        store.get(&kek, "a", "prod", None).unwrap().1.as_slice(),
        b"flip-me"
    );
}

fn wrong_kek_is_refused(c: Case) {
    let (mut store, kek) = (c.store, new_kek());
    put(&mut store, &kek, "a", "prod", b"v", 10);
    let other = Kek::from_key(Key256::generate().unwrap());
    let e = store.get(&other, "a", "prod", None).unwrap_err();
    assert_eq!(e.kind, ErrorKind::Integrity);
    assert!(e.message.contains("master key"), "{e}");
}

/// Found by the `store_rows` fuzz target: the master-key id of a row is
/// database text, so a tampered one must not put a line break (a forged log
/// line) or a control character into the error.
#[test]
fn a_tampered_master_key_id_is_quoted_in_errors() {
    let c = sqlite_case();
    let (mut store, kek) = (c.store, new_kek());
    put(&mut store, &kek, "a", "prod", b"v", 10);
    c.raw.exec(
        "UPDATE secret_versions SET kek_id = 'x' || char(10) || 'FORGED' || char(27)",
        &[],
    );
    let e = store.get(&kek, "a", "prod", None).unwrap_err();
    assert_eq!(e.kind, ErrorKind::Integrity);
    assert!(e.message.contains(r#"master key "x\nFORGED\u{1b}""#), "{e}");
    let e = store.rewrap(&kek, &new_kek(), &[]).unwrap_err();
    assert_eq!(e.kind, ErrorKind::Integrity);
    assert!(!e.message.contains(['\n', '\u{1b}']), "{e}");
}

fn rewrap_changes_kek_and_keeps_values(c: Case) {
    let kek = new_kek();
    let mut store = c.store;
    put(&mut store, &kek, "a", "prod", b"va", 10);
    put(&mut store, &kek, "b", "dev", b"vb", 10);
    let ciphertexts = "SELECT ciphertext FROM secret_versions ORDER BY name";
    let before = c.raw.rows(ciphertexts);
    let new = new_kek();
    let n = store.rewrap(&kek, &new, &[("seal", "x".into())]).unwrap();
    assert_eq!(n, 2);
    assert_eq!(
        store.get(&new, "a", "prod", None).unwrap().1.as_slice(),
        b"va"
    );
    assert_eq!(
        store.get(&new, "b", "dev", None).unwrap().1.as_slice(),
        b"vb"
    );
    assert!(store.get(&kek, "a", "prod", None).is_err());
    assert_eq!(
        before,
        c.raw.rows(ciphertexts),
        "KEK rotation must not touch value ciphertexts"
    );
    assert_eq!(
        store.backend().meta_get("seal").unwrap().as_deref(),
        Some("x")
    );
    // A row that does not open under the old key stops the rotation: nothing changes.
    c.raw.exec(
        "UPDATE secret_versions SET kek_id = 'other' WHERE name = 'b'",
        &[],
    );
    let newer = new_kek();
    assert!(store.rewrap(&new, &newer, &[("seal", "y".into())]).is_err());
    assert_eq!(
        store.get(&new, "a", "prod", None).unwrap().1.as_slice(),
        b"va"
    );
    assert_eq!(
        store.backend().meta_get("seal").unwrap().as_deref(),
        Some("x")
    );
}

fn failing_commit_hook_rolls_back(c: Case) {
    let (mut store, kek) = (c.store, new_kek());
    let e = store
        .put(&kek, nv("a", "prod", b"v", 10), &mut |_| {
            Err(crate::error::Error::internal("audit disk full"))
        })
        .unwrap_err();
    assert!(e.message.contains("audit disk full"));
    assert!(store.backend().list(None).unwrap().is_empty());
    put(&mut store, &kek, "a", "prod", b"v", 10);
    let e = store
        .backend_mut()
        .remove("a", "prod", &mut |_| {
            Err(crate::error::Error::internal("nope"))
        })
        .unwrap_err();
    assert!(e.message.contains("nope"));
    assert_eq!(store.backend().list(None).unwrap().len(), 1);
    // The failed put used no version number a reader could see: the next is 2.
    assert_eq!(put(&mut store, &kek, "a", "prod", b"w", 10), 2);
    assert_eq!(store.get(&kek, "a", "prod", None).unwrap().0, 2);
}

fn meta_and_lease_rows_roundtrip(c: Case) {
    let mut store = c.store;
    let b = store.backend_mut();
    assert_eq!(b.meta_get("k").unwrap(), None);
    b.meta_set("k", "v1").unwrap();
    b.meta_set("k", "v2").unwrap();
    assert_eq!(b.meta_get("k").unwrap().as_deref(), Some("v2"));
    // A prefix listing: by key, nothing outside the prefix (`_` and `%` are
    // not patterns).
    b.meta_set("node/b", "2").unwrap();
    b.meta_set("node/a", "1").unwrap();
    b.meta_set("node_x", "3").unwrap();
    b.meta_set("nodes", "4").unwrap();
    assert_eq!(
        b.meta_list("node/").unwrap(),
        vec![("node/a".into(), "1".into()), ("node/b".into(), "2".into())]
    );
    assert!(b.meta_list("node%").unwrap().is_empty());
    b.meta_delete("node/a").unwrap();
    b.meta_delete("node/absent").unwrap();
    assert_eq!(b.meta_list("node/").unwrap().len(), 1);
    assert_eq!(b.meta_get("node/a").unwrap(), None);
    let lease = |id: &str, created_at: i64| LeaseRow {
        id: id.into(),
        route: "orders-db".into(),
        workload: "reports".into(),
        role: format!("warden_lease_{id}"),
        state: "creating".into(),
        owner_pid: 4242,
        created_at,
        expires_at: created_at + 3600,
        max_expires_at: created_at + 86_400,
    };
    b.lease_put(&lease("l2", 200)).unwrap();
    b.lease_put_many(&[lease("l1", 100), lease("l3", 300)])
        .unwrap();
    let mut active = lease("l2", 200);
    active.state = "active".into();
    b.lease_put(&active).unwrap();
    let rows = b.lease_list().unwrap();
    assert_eq!(rows, vec![lease("l1", 100), active, lease("l3", 300)]);
    b.lease_delete("l1").unwrap();
    b.lease_delete("absent").unwrap();
    assert_eq!(b.lease_list().unwrap().len(), 2);
    // Listing an environment that has nothing is empty, not an error.
    assert!(store.backend().list(Some("nowhere")).unwrap().is_empty());
}

#[test]
fn names_and_envs_are_validated() {
    for ok in ["orders-db/app", "a", "x.y_z-1/b2"] {
        validate_secret_name(ok).unwrap();
    }
    for bad in [
        "",
        "Upper",
        "/lead",
        "trail/",
        "a//b",
        "sp ace",
        "-x",
        &"a".repeat(129),
    ] {
        assert!(validate_secret_name(bad).is_err(), "{bad:?} accepted");
    }
    validate_env("prod").unwrap();
    for bad in ["", "Prod", "-x", &"e".repeat(33), "a/b"] {
        assert!(validate_env(bad).is_err(), "{bad:?} accepted");
    }
}
