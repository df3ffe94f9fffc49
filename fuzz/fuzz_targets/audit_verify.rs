//! `warden audit verify` (`warden_core::audit::verify`) on a corrupted or
//! forged log: the fuzzer's bytes are the log file, and after the first NUL
//! byte, its head anchor (`<log>.head`).
//!
//! Properties: never a panic; the answer is a report or a typed
//! `AuditError`; a report never claims more intact records than the file
//! has lines; a report without a problem names the last record's hash (or
//! the genesis hash for an empty chain); verifying twice gives the same
//! report.
#![no_main]

use libfuzzer_sys::fuzz_target;
use std::path::PathBuf;
use std::sync::OnceLock;
use warden_core::audit::verify;

fn scratch_dir() -> &'static PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("warden-fuzz-audit-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("scratch directory");
        dir
    })
}

fuzz_target!(|data: &[u8]| {
    let (log, anchor) = match data.iter().position(|&b| b == 0) {
        Some(i) => (&data[..i], Some(&data[i + 1..])),
        None => (data, None),
    };
    let dir = scratch_dir();
    let log_path = dir.join("audit.log");
    let head_path = dir.join("audit.log.head");
    std::fs::write(&log_path, log).expect("write the log");
    match anchor {
        Some(bytes) => std::fs::write(&head_path, bytes).expect("write the anchor"),
        None => {
            let _ = std::fs::remove_file(&head_path);
        }
    }
    let first = verify(&log_path);
    match &first {
        Ok(report) => {
            let lines = log.split(|&b| b == b'\n').filter(|l| !l.is_empty()).count() as u64;
            assert!(
                report.records <= lines,
                "{} records from {lines} lines",
                report.records
            );
            assert!(!report.last_hash.is_empty());
        }
        Err(err) => assert!(!err.to_string().is_empty()),
    }
    let second = verify(&log_path);
    assert_eq!(format!("{first:?}"), format!("{second:?}"));
});
