//! The configuration loader (`warden_core::config::parse_str`) on arbitrary
//! UTF-8: syntax stage, shape repair and retry, semantic checks and the
//! suggestion engine.
//!
//! Properties: never a panic; a rejection carries at least one error, each
//! a single line with a problem and a fix; once the text is valid TOML,
//! every error names the key it is about; loading is deterministic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use std::path::Path;
use warden_core::config::parse_str;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let origin = Path::new("/etc/warden/fuzz.toml");
    let first = parse_str(text, origin);
    match &first {
        Ok(_) => {}
        Err(report) => {
            assert!(!report.errors.is_empty(), "a rejection without an error");
            let valid_toml = text.parse::<toml::Table>().is_ok();
            for issue in report.errors.iter().chain(&report.warnings) {
                assert!(
                    !issue.problem.is_empty() && !issue.fix.is_empty(),
                    "{issue:?}"
                );
                assert!(
                    !issue.problem.contains('\n') && !issue.fix.contains('\n'),
                    "{issue:?}"
                );
                assert!(!issue.key.contains('\n'), "{issue:?}");
            }
            if valid_toml {
                for issue in &report.errors {
                    assert!(!issue.key.is_empty(), "an error without a key: {issue:?}");
                }
            }
            assert!(!report.to_string().is_empty());
        }
    }
    // Same text, same answer (no hidden state between loads).
    let second = parse_str(text, origin);
    assert_eq!(first.is_ok(), second.is_ok());
    if let (Err(a), Err(b)) = (&first, &second) {
        assert_eq!(a, b);
    }
});
