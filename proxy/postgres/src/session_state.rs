//! Which client requests can leave session state behind on the upstream
//! connection — the question that decides whether a pooled connection needs
//! `DISCARD ALL` before the next client (see [`super::pool`]).
//!
//! The answer is conservative: a request is *state-free* only when warden
//! can show it from the bytes alone. Everything else counts as state:
//! - SQL (a Query message, or the statement of a Parse message) is
//!   state-free when every statement in it is a `SELECT` or `SHOW` that calls
//!   no function except a short list of pure built-ins ([`PURE`]) and has no
//!   `INTO`, or a transaction-control statement (`BEGIN`, `COMMIT`, …, which
//!   end with the session's transaction anyway). `SET`, `PREPARE`,
//!   `DECLARE`, `LISTEN`, `CREATE TEMP …`, `SELECT … INTO`,
//!   `SELECT set_config(…)`, `SELECT pg_advisory_lock(…)`, `nextval(…)`
//!   (it sets `currval`/`lastval`) and any other statement or function call
//!   are state.
//! - Ambiguous text is state: a string literal holding a backslash outside
//!   an `E'…'` string (its end depends on `standard_conforming_strings`), an
//!   unterminated literal, quoted identifier, dollar quote or comment, a NUL
//!   byte.
//! - Protocol messages other than Query, Parse with an unnamed statement,
//!   Bind, Describe, Execute, Close, Sync, Flush and Terminate are state
//!   (FunctionCall, COPY data).
//!
//! What bytes cannot show: a view, rule, trigger or user-defined operator
//! that runs a function changing session state when a plain `SELECT` reads
//! it. Only clients sharing the same upstream role and credential share a
//! pooled connection, and each could run that SQL itself; routes whose
//! database holds such objects set `pool.reset = "always"`.

use warden_core::sql_tokens::{is_one_of, Recent, Token};

/// Built-in functions (resolved in `pg_catalog`) that change no session
/// state; a `SELECT` calling only these (and keyword forms such as
/// `EXISTS (…)`, `IN (…)`, `CAST (…)`) stays state-free.
const PURE: &[&str] = &[
    "abs",
    "avg",
    "array_agg",
    "bool_and",
    "bool_or",
    "cast",
    "ceil",
    "char_length",
    "coalesce",
    "concat",
    "count",
    "date_trunc",
    "extract",
    "floor",
    "greatest",
    "least",
    "length",
    "lower",
    "max",
    "min",
    "now",
    "nullif",
    "position",
    "round",
    "string_agg",
    "substring",
    "sum",
    "trim",
    "upper",
];

/// Keywords that may stand before `(` without being a function call.
const PAREN_KEYWORDS: &[&str] = &[
    "all",
    "and",
    "any",
    "array",
    "as",
    "between",
    "by",
    "case",
    "distinct",
    "else",
    "except",
    "exists",
    "filter",
    "from",
    "group",
    "having",
    "ilike",
    "in",
    "intersect",
    "is",
    "join",
    "lateral",
    "like",
    "limit",
    "not",
    "offset",
    "on",
    "or",
    "order",
    "over",
    "partition",
    "row",
    "select",
    "some",
    "then",
    "union",
    "using",
    "values",
    "when",
    "where",
    "within",
];

/// Transaction control: state-free (whatever it opens ends with the
/// transaction, and a session that leaves a transaction open is reset).
const TRANSACTION: &[&str] = &[
    "abort",
    "begin",
    "commit",
    "end",
    "release",
    "rollback",
    "savepoint",
    "start",
];

/// Splits `sql` into tokens, handing each to `each` (false stops); false
/// when `each` stopped or the text is ambiguous or malformed (see the
/// module documentation). Allocates nothing.
fn lex<'a>(sql: &'a [u8], mut each: impl FnMut(Token<'a>) -> bool) -> bool {
    lex_inner(sql, &mut each).is_some()
}

fn lex_inner<'a>(sql: &'a [u8], each: &mut impl FnMut(Token<'a>) -> bool) -> Option<()> {
    let mut out = Emit(each);
    let mut i = 0;
    let word_byte = |b: u8| b.is_ascii_alphanumeric() || b == b'_' || b == b'$' || b >= 0x80;
    while i < sql.len() {
        let b = sql[i];
        match b {
            0 => return None,
            b' ' | b'\t' | b'\n' | b'\r' | 0x0c => i += 1,
            b'-' if sql.get(i + 1) == Some(&b'-') => {
                while i < sql.len() && sql[i] != b'\n' {
                    i += 1;
                }
            }
            b'/' if sql.get(i + 1) == Some(&b'*') => {
                // Block comments nest.
                let mut depth = 0usize;
                loop {
                    match (sql.get(i), sql.get(i + 1)) {
                        (Some(b'/'), Some(b'*')) => {
                            depth += 1;
                            i += 2;
                        }
                        (Some(b'*'), Some(b'/')) => {
                            depth -= 1;
                            i += 2;
                            if depth == 0 {
                                break;
                            }
                        }
                        (Some(_), _) => i += 1,
                        (None, _) => return None,
                    }
                }
            }
            b'\'' => {
                i = string_end(sql, i + 1, Quote::Standard)?;
                out.push(Token::Literal)?;
            }
            b'"' => {
                i = quoted_end(sql, i + 1)?;
                out.push(Token::Quoted)?;
            }
            b'$' if sql.get(i + 1).is_some_and(u8::is_ascii_digit) => {
                i += 1;
                while i < sql.len() && sql[i].is_ascii_digit() {
                    i += 1;
                }
                out.push(Token::Literal)?;
            }
            b'$' => {
                // A dollar quote: $tag$ … $tag$ (the tag may be empty).
                let mut j = i + 1;
                while j < sql.len() && sql[j] != b'$' {
                    let first = j == i + 1;
                    if !word_byte(sql[j]) || first && sql[j].is_ascii_digit() {
                        return None;
                    }
                    j += 1;
                }
                if j >= sql.len() {
                    return None;
                }
                let tag = &sql[i..=j];
                let body = j + 1;
                let close = sql[body..].windows(tag.len()).position(|w| w == tag)?;
                i = body + close + tag.len();
                out.push(Token::Literal)?;
            }
            b'0'..=b'9' => {
                while i < sql.len()
                    && (sql[i].is_ascii_alphanumeric() || sql[i] == b'.' || sql[i] == b'_')
                {
                    i += 1;
                }
                out.push(Token::Literal)?;
            }
            _ if word_byte(b) => {
                let start = i;
                while i < sql.len() && word_byte(sql[i]) {
                    i += 1;
                }
                let word = &sql[start..i];
                match sql.get(i) {
                    // E'…' (backslash escapes), B'…', X'…', N'…', U&'…'.
                    Some(b'\'') if word.len() == 1 => {
                        let quote = if word.eq_ignore_ascii_case(b"e") {
                            Quote::Escape
                        } else {
                            Quote::Standard
                        };
                        i = string_end(sql, i + 1, quote)?;
                        out.push(Token::Literal)?;
                    }
                    Some(b'&') if word.eq_ignore_ascii_case(b"u") => match sql.get(i + 1) {
                        Some(b'\'') => {
                            i = string_end(sql, i + 2, Quote::Unicode)?;
                            out.push(Token::Literal)?;
                        }
                        Some(b'"') => {
                            i = quoted_end(sql, i + 2)?;
                            out.push(Token::Quoted)?;
                        }
                        _ => out.push(Token::Word(word))?,
                    },
                    _ => out.push(Token::Word(word))?,
                }
            }
            _ => {
                out.push(Token::Punct(b))?;
                i += 1;
            }
        }
    }
    Some(())
}

/// Feeds tokens to the callback; `push` returns None when it said stop.
struct Emit<'f, F>(&'f mut F);

impl<'a, F: FnMut(Token<'a>) -> bool> Emit<'_, F> {
    fn push(&mut self, t: Token<'a>) -> Option<()> {
        (self.0)(t).then_some(())
    }
}

/// How a string literal treats a backslash.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Quote {
    /// `'…'`, `N'…'`, `B'…'`, `X'…'`: whether a backslash escapes the quote
    /// depends on `standard_conforming_strings`, so a backslash is
    /// ambiguous.
    Standard,
    /// `E'…'`: a backslash escapes the next byte.
    Escape,
    /// `U&'…'` (only valid with standard strings): a backslash starts a
    /// Unicode escape and never escapes the quote.
    Unicode,
}

/// The offset after the closing quote of a string literal whose body starts
/// at `i`; None when it is unterminated or ambiguous.
fn string_end(sql: &[u8], mut i: usize, quote: Quote) -> Option<usize> {
    while i < sql.len() {
        match sql[i] {
            b'\\' if quote == Quote::Escape => i += 2,
            b'\\' if quote == Quote::Standard => return None,
            b'\'' if sql.get(i + 1) == Some(&b'\'') => i += 2,
            b'\'' => return Some(i + 1),
            _ => i += 1,
        }
    }
    None
}

/// The offset after the closing `"` of a quoted identifier starting at `i`.
fn quoted_end(sql: &[u8], mut i: usize) -> Option<usize> {
    while i < sql.len() {
        match sql[i] {
            b'"' if sql.get(i + 1) == Some(&b'"') => i += 2,
            b'"' => return Some(i + 1),
            _ => i += 1,
        }
    }
    None
}

/// True when running `sql` (a Query message's text, or a Parse message's
/// statement) can leave no session state behind (see the module docs).
pub fn sql_is_state_free(sql: &[u8]) -> bool {
    let mut stmt = Statement::default();
    lex(sql, |t| stmt.feed(t)) && stmt.end()
}

/// What the statement being read is.
#[derive(Clone, Copy, Default, PartialEq, Eq)]
enum Kind {
    /// Nothing read yet (an empty statement is state-free).
    #[default]
    Empty,
    Transaction,
    /// `SHOW`, with the number of words after it.
    Show(u8),
    Select,
}

/// The state-free check of one statement after another, token by token.
#[derive(Default)]
struct Statement<'a> {
    kind: Kind,
    /// The tokens before the current one, in this statement.
    recent: Recent<'a>,
}

impl<'a> Statement<'a> {
    /// False: the statement is not state-free.
    fn feed(&mut self, t: Token<'a>) -> bool {
        if t == Token::Punct(b';') {
            let ok = self.end();
            *self = Statement::default();
            return ok;
        }
        let ok = match (self.kind, t) {
            (Kind::Empty, Token::Word(w)) => {
                self.kind = if is_one_of(w, TRANSACTION) {
                    Kind::Transaction
                } else if w.eq_ignore_ascii_case(b"show") {
                    Kind::Show(0)
                } else if w.eq_ignore_ascii_case(b"select") {
                    Kind::Select
                } else {
                    return false;
                };
                true
            }
            (Kind::Empty, _) => false,
            (Kind::Transaction, t) => matches!(t, Token::Word(_)),
            (Kind::Show(n), Token::Word(_)) => {
                self.kind = Kind::Show(n.saturating_add(1));
                true
            }
            (Kind::Show(_), _) => false,
            (Kind::Select, Token::Word(w)) => !w.eq_ignore_ascii_case(b"into"),
            (Kind::Select, Token::Punct(b'(')) => self.recent.call_ok(PURE, PAREN_KEYWORDS),
            (Kind::Select, _) => true,
        };
        self.recent.push(t);
        ok
    }

    /// At the end of a statement: false when it is incomplete in a way that
    /// matters (`SHOW` takes exactly one name).
    fn end(&self) -> bool {
        !matches!(self.kind, Kind::Show(n) if n != 1)
    }
}

/// Follows the client → upstream messages of a session (headers from the
/// relay's framer, bodies when a message arrived whole in one read).
#[derive(Clone, Copy, Debug, Default)]
pub struct StateTracker {
    /// Something the session sent may have left session state.
    pub dirty: bool,
}

impl StateTracker {
    /// One client message: `tag`, and its body when it arrived whole (None
    /// when it spans reads: counted as state, unless the tag cannot carry
    /// any).
    pub fn client_message(&mut self, tag: u8, body: Option<&[u8]>) {
        if self.dirty {
            return;
        }
        let clean = match tag {
            // Sync, Flush, Terminate, Execute, Describe, Close, Bind: no state
            // of their own (a named portal ends with its transaction).
            b'S' | b'H' | b'X' | b'E' | b'D' | b'C' | b'B' => true,
            b'Q' => body.is_some_and(|b| sql_is_state_free(strip_nul(b))),
            // Parse: an unnamed statement only (a named one outlives it).
            b'P' => body.is_some_and(|b| match b.split_first() {
                Some((0, rest)) => rest
                    .iter()
                    .position(|&c| c == 0)
                    .is_some_and(|end| sql_is_state_free(&rest[..end])),
                _ => false,
            }),
            _ => false,
        };
        self.dirty = !clean;
    }

    /// One upstream message: a ParameterStatus after the greeting means a
    /// reported setting changed; a notification means a LISTEN.
    pub fn upstream_message(&mut self, tag: u8) {
        if matches!(tag, b'S' | b'A' | b'G' | b'H' | b'W') {
            self.dirty = true;
        }
    }
}

fn strip_nul(b: &[u8]) -> &[u8] {
    b.strip_suffix(&[0]).unwrap_or(b)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_selects_and_transaction_control_are_state_free() {
        for sql in [
            "SELECT abalance FROM pgbench_accounts WHERE aid = 51234;",
            "select 1",
            "  -- a comment\nSELECT /* nested /* comment */ here */ x FROM t",
            "SELECT count(*), max(x) FROM t WHERE y IN (1, 2) AND EXISTS (SELECT 1 FROM u)",
            "SELECT 'it''s', E'\\'', $$ set_config('a','b',false) $$, $q$x$q$ FROM t",
            "SELECT * FROM t WHERE a = $1 AND b = $2",
            "BEGIN; SELECT x FROM t FOR UPDATE; COMMIT;",
            "START TRANSACTION ISOLATION LEVEL SERIALIZABLE",
            "SHOW work_mem",
            "",
            ";",
            "SELECT CAST (x AS int) FROM \"T\"",
            "SELECT U&'d\\0061t' FROM t",
        ] {
            assert!(sql_is_state_free(sql.as_bytes()), "{sql}");
        }
    }

    #[test]
    fn anything_that_can_leave_state_is_not() {
        for sql in [
            "SET work_mem = '64MB'",
            "SELECT set_config('work_mem', '64MB', false)",
            "SELECT pg_advisory_lock(1)",
            "SELECT nextval('s')",
            "SELECT * INTO TEMP leak FROM t",
            "select x into leak from t",
            "PREPARE p AS SELECT 1",
            "DECLARE c CURSOR WITH HOLD FOR SELECT 1",
            "LISTEN ch",
            "CREATE TEMP TABLE x (a int)",
            "DISCARD ALL",
            "WITH d AS (DELETE FROM t RETURNING *) SELECT * FROM d",
            "INSERT INTO t VALUES (1)",
            "SELECT 1; SET role = 'admin'",
            "SELECT pg_catalog.set_config('a', 'b', false)",
            "SELECT public.count(x) FROM t",
            "SELECT \"set_config\"('a', 'b', false)",
            "SELECT U&\"set_config\"('a', 'b', false)",
            "SHOW ALL; SET x = 1",
            "BEGIN; SELECT set_config('a', 'b', true); COMMIT",
            "SELECT $1::int FROM f($2)",
            // E-strings and dollar quotes hiding a call from a naive lexer.
            "SELECT E'\\'', set_config('a','b',false) --'",
            // A backslash in a standard string: its end depends on a setting.
            "SELECT 'a\\', set_config('a','b',false) --'",
            "SELECT 'unterminated",
            "SELECT $tag$ unterminated",
            "SELECT /* unterminated",
            "SELECT \"unterminated",
            "SELECT 1\0; SET x = 1",
        ] {
            assert!(!sql_is_state_free(sql.as_bytes()), "{sql}");
        }
    }

    fn body(parts: &[&[u8]]) -> Vec<u8> {
        parts.concat()
    }

    #[test]
    fn the_tracker_follows_protocol_messages() {
        let mut t = StateTracker::default();
        t.client_message(b'Q', Some(b"SELECT 1\0"));
        t.client_message(b'P', Some(&body(&[b"\0", b"SELECT $1\0", b"\0\0"])));
        for tag in *b"BDESHCX" {
            t.client_message(tag, None);
        }
        t.upstream_message(b'T');
        t.upstream_message(b'D');
        t.upstream_message(b'Z');
        assert!(!t.dirty);

        for (tag, b) in [
            (b'P', Some(body(&[b"s1\0", b"SELECT 1\0", b"\0\0"]))),
            (b'Q', None),
            (b'F', Some(vec![0, 0, 0, 1])),
            (b'd', Some(b"data".to_vec())),
            (b'Q', Some(b"SET x = 1\0".to_vec())),
        ] {
            let mut t = StateTracker::default();
            t.client_message(tag, b.as_deref());
            assert!(t.dirty, "{}", tag as char);
        }
        for tag in *b"SAGHW" {
            let mut t = StateTracker::default();
            t.upstream_message(tag);
            assert!(t.dirty, "{}", tag as char);
        }
    }
}
