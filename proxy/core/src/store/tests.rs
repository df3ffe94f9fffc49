use super::sqlite::SqliteBackend;
use super::*;
use crate::error::ErrorKind;
use crate::masterkey::Kek;
use rusqlite::params;

const DISTINCT: &[u8] = b"pl41ntext-CANARY-7f3e9b-value";

fn setup() -> (tempfile::TempDir, std::path::PathBuf, SecretStore, Kek) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store.db");
    let store = SecretStore::new(Box::new(SqliteBackend::open(&path).unwrap()));
    let kek = Kek::from_key(Key256::generate().unwrap());
    (dir, path, store, kek)
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

fn raw(path: &std::path::Path) -> rusqlite::Connection {
    rusqlite::Connection::open(path).unwrap()
}

#[test]
fn values_roundtrip_by_env_and_version() {
    let (_d, _p, mut store, kek) = setup();
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

#[test]
fn old_versions_are_pruned_and_numbers_never_repeat() {
    let (_d, _p, mut store, kek) = setup();
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

#[test]
fn store_file_holds_no_plaintext() {
    let (dir, path, mut store, kek) = setup();
    put(&mut store, &kek, "canary/secret", "prod", DISTINCT, 10);
    drop(store);
    for entry in std::fs::read_dir(dir.path()).unwrap() {
        let bytes = std::fs::read(entry.unwrap().path()).unwrap();
        assert!(
            !bytes.windows(DISTINCT.len()).any(|w| w == DISTINCT),
            "plaintext found in {}",
            path.display()
        );
    }
}

#[test]
fn swapped_rows_give_integrity_errors_not_wrong_values() {
    let (_d, path, mut store, kek) = setup();
    put(&mut store, &kek, "a", "prod", b"value-a", 10);
    put(&mut store, &kek, "b", "prod", b"value-b", 10);
    let c = raw(&path);
    let (wa, ca): (Vec<u8>, Vec<u8>) = c
        .query_row(
            "SELECT wrapped_key, ciphertext FROM secret_versions WHERE name='a'",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .unwrap();
    let (wb, cb): (Vec<u8>, Vec<u8>) = c
        .query_row(
            "SELECT wrapped_key, ciphertext FROM secret_versions WHERE name='b'",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .unwrap();
    // Whole rows swapped.
    c.execute(
        "UPDATE secret_versions SET wrapped_key=?1, ciphertext=?2 WHERE name='a'",
        params![wb, cb],
    )
    .unwrap();
    c.execute(
        "UPDATE secret_versions SET wrapped_key=?1, ciphertext=?2 WHERE name='b'",
        params![wa, ca],
    )
    .unwrap();
    for name in ["a", "b"] {
        let e = store.get(&kek, name, "prod", None).unwrap_err();
        assert_eq!(e.kind, ErrorKind::Integrity, "{e}");
        assert!(e.message.contains(&format!("{name:?}")), "{e}");
    }
    // Only the ciphertexts swapped (wrapped keys back in place).
    c.execute(
        "UPDATE secret_versions SET wrapped_key=?1, ciphertext=?2 WHERE name='a'",
        params![wa, cb],
    )
    .unwrap();
    let e = store.get(&kek, "a", "prod", None).unwrap_err();
    assert_eq!(e.kind, ErrorKind::Integrity);
    assert!(e.message.contains("ciphertext"), "{e}");
}

#[test]
fn version_renumbering_is_detected() {
    let (_d, path, mut store, kek) = setup();
    put(&mut store, &kek, "a", "prod", b"old", 10);
    put(&mut store, &kek, "a", "prod", b"new", 10);
    // An attacker deletes v2 and renumbers v1 as v2 to roll the secret back.
    let c = raw(&path);
    c.execute("DELETE FROM secret_versions WHERE version = 2", [])
        .unwrap();
    c.execute(
        "UPDATE secret_versions SET version = 2 WHERE version = 1",
        [],
    )
    .unwrap();
    assert_eq!(
        store.get(&kek, "a", "prod", None).unwrap_err().kind,
        ErrorKind::Integrity
    );
}

#[test]
fn every_flipped_byte_is_detected() {
    let (_d, path, mut store, kek) = setup();
    put(&mut store, &kek, "a", "prod", b"flip-me", 10);
    let c = raw(&path);
    for col in ["wrapped_key", "ciphertext"] {
        let orig: Vec<u8> = c
            .query_row(&format!("SELECT {col} FROM secret_versions"), [], |r| {
                r.get(0)
            })
            .unwrap();
        for i in 0..orig.len() {
            let mut t = orig.clone();
            t[i] ^= 0x80;
            c.execute(
                &format!("UPDATE secret_versions SET {col} = ?1"),
                params![t],
            )
            .unwrap();
            let e = store.get(&kek, "a", "prod", None).unwrap_err();
            assert_eq!(e.kind, ErrorKind::Integrity, "{col} byte {i}: {e}");
        }
        c.execute(
            &format!("UPDATE secret_versions SET {col} = ?1"),
            params![orig],
        )
        .unwrap();
    }
    assert_eq!(
        store.get(&kek, "a", "prod", None).unwrap().1.as_slice(),
        b"flip-me"
    );
}

#[test]
fn wrong_kek_is_refused() {
    let (_d, _p, mut store, kek) = setup();
    put(&mut store, &kek, "a", "prod", b"v", 10);
    let other = Kek::from_key(Key256::generate().unwrap());
    let e = store.get(&other, "a", "prod", None).unwrap_err();
    assert_eq!(e.kind, ErrorKind::Integrity);
    assert!(e.message.contains("master key"), "{e}");
}

#[test]
fn rewrap_changes_kek_and_keeps_values() {
    let (_d, path, mut store, kek) = setup();
    put(&mut store, &kek, "a", "prod", b"va", 10);
    put(&mut store, &kek, "b", "dev", b"vb", 10);
    let before: Vec<Vec<u8>> = raw(&path)
        .prepare("SELECT ciphertext FROM secret_versions ORDER BY name")
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .map(|r| r.unwrap())
        .collect();
    let new = Kek::from_key(Key256::generate().unwrap());
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
    let after: Vec<Vec<u8>> = raw(&path)
        .prepare("SELECT ciphertext FROM secret_versions ORDER BY name")
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .map(|r| r.unwrap())
        .collect();
    assert_eq!(
        before, after,
        "KEK rotation must not touch value ciphertexts"
    );
    assert_eq!(
        store.backend().meta_get("seal").unwrap().as_deref(),
        Some("x")
    );
}

#[test]
fn failing_commit_hook_rolls_back() {
    let (_d, _p, mut store, kek) = setup();
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
