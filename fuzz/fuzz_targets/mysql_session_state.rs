//! The MySQL pool's state-free check (`warden_mysql::session_state`): the
//! SQL lexer behind `pool.reset = "auto"` on mysql routes, which decides
//! whether a connection goes back to the pool without
//! `COM_RESET_CONNECTION`.
//!
//! Properties: never a panic or a hang on any bytes; the same answer twice;
//! a statement boundary isolates what follows it (`SELECT 1;` before the
//! text changes nothing); a statement that sets state (`SET`, `PREPARE`,
//! `CREATE TEMPORARY`, `LOCK TABLES`) before the text always makes the
//! whole unclean, and so does one after a clean text and a line break; a
//! `COM_QUERY` of the text gets the same answer, any other command byte
//! but `COM_PING` is never clean.
#![no_main]

use libfuzzer_sys::fuzz_target;
use warden_mysql::session_state::{command_is_state_free, sql_is_state_free};

const STATEFUL: &[&[u8]] = &[
    b"SET @a = 1",
    b"PREPARE p FROM 'SELECT 1'",
    b"CREATE TEMPORARY TABLE t (a int)",
    b"LOCK TABLES t READ",
    b"SELECT GET_LOCK('a', 1)",
];

fuzz_target!(|sql: &[u8]| {
    let free = sql_is_state_free(sql);
    assert_eq!(free, sql_is_state_free(sql), "not deterministic");

    let mut prefixed = b"SELECT 1; ".to_vec();
    prefixed.extend_from_slice(sql);
    assert_eq!(
        sql_is_state_free(&prefixed),
        free,
        "a prefix statement changed the answer"
    );

    for s in STATEFUL {
        let mut before = s.to_vec();
        before.extend_from_slice(b"; ");
        before.extend_from_slice(sql);
        assert!(
            !sql_is_state_free(&before),
            "state set before the text was missed"
        );
        if free {
            // A clean text ends between tokens: after a line break (which
            // ends a `#` or `-- ` comment) a `;` starts a new statement.
            let mut after = sql.to_vec();
            after.extend_from_slice(b"\n; ");
            after.extend_from_slice(s);
            assert!(
                !sql_is_state_free(&after),
                "state set after a clean text was missed"
            );
        }
    }

    let mut query = vec![0x03];
    query.extend_from_slice(sql);
    assert_eq!(command_is_state_free(&query), free);
    if let Some((&first, rest)) = sql.split_first() {
        let mut other = vec![first];
        other.extend_from_slice(rest);
        let clean = command_is_state_free(&other);
        match first {
            0x03 => assert_eq!(clean, sql_is_state_free(rest)),
            0x0e => assert_eq!(clean, rest.is_empty()),
            _ => assert!(!clean, "command {first:#04x} taken for state-free"),
        }
    }
});
