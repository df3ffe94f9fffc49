//! The PostgreSQL pool's state-free check (`warden_postgres::session_state`):
//! the SQL lexer behind `pool.reset = "auto"`, which decides whether a
//! connection goes back to the pool without `DISCARD ALL`.
//!
//! Properties: never a panic or a hang on any bytes; the same answer
//! twice; a statement boundary isolates what follows it (`SELECT 1;` before
//! the text changes nothing); a statement that sets state (`SET`,
//! `PREPARE`, `LISTEN`, `CREATE TEMP`) before or after the text always
//! makes the whole unclean; the tracker agrees with the check for a whole
//! Query message and for an unnamed Parse, and a named Parse is never
//! clean.
#![no_main]

use libfuzzer_sys::fuzz_target;
use warden_postgres::session_state::{sql_is_state_free, StateTracker};

const STATEFUL: &[&[u8]] = &[
    b"SET search_path = x",
    b"PREPARE p AS SELECT 1",
    b"LISTEN chan",
    b"CREATE TEMP TABLE t (a int)",
];

fn tracked(tag: u8, body: &[u8]) -> bool {
    let mut t = StateTracker::default();
    t.client_message(tag, Some(body));
    !t.dirty
}

fuzz_target!(|sql: &[u8]| {
    let free = sql_is_state_free(sql);
    assert_eq!(free, sql_is_state_free(sql), "not deterministic");

    let mut prefixed = b"SELECT 1; ".to_vec();
    prefixed.extend_from_slice(sql);
    assert_eq!(sql_is_state_free(&prefixed), free, "a prefix statement changed the answer");

    for s in STATEFUL {
        let mut before = s.to_vec();
        before.extend_from_slice(b"; ");
        before.extend_from_slice(sql);
        assert!(!sql_is_state_free(&before), "state set before the text was missed");
    }

    // A Query message's body is the text and a NUL.
    let mut query = sql.to_vec();
    query.push(0);
    assert_eq!(tracked(b'Q', &query), free);
    // Parse: statement name, NUL, text, NUL, parameter types.
    if !sql.contains(&0) {
        let mut parse = vec![0];
        parse.extend_from_slice(sql);
        parse.extend_from_slice(&[0, 0, 0]);
        assert_eq!(tracked(b'P', &parse), free);
        let mut named = b"s1\0".to_vec();
        named.extend_from_slice(sql);
        named.extend_from_slice(&[0, 0, 0]);
        assert!(!tracked(b'P', &named));
    }
});
