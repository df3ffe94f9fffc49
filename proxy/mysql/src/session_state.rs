//! Which client commands can leave session state behind on a MySQL/MariaDB
//! connection — the question that decides whether a pooled connection
//! needs the reset ([`crate::pool::reset`]) before the next client
//! (`pool.reset = "auto"`, the default).
//!
//! The answer is conservative: a command is *state-free* only when warden
//! can show it from the bytes alone. Everything else counts as state.
//! - `COM_PING` is state-free. `COM_QUERY` is state-free when every
//!   statement in its text is a `SELECT` or `SHOW` that calls no function
//!   except a short list of long-standing pure built-ins ([`PURE`]; a
//!   stored function or UDF cannot take a built-in's name unqualified) and
//!   has no `INTO`, no `:=` assignment and no sequence access (`NEXT VALUE
//!   FOR`, `NEXTVAL(…)`). Every other command — `COM_INIT_DB`, prepared
//!   statements (they outlive the session), `COM_SET_OPTION`, and
//!   statements such as `SET`, `USE`, `BEGIN`, `LOCK TABLES`, `HANDLER`,
//!   `CALL`, `DO`, `CREATE TEMPORARY TABLE`, `SELECT GET_LOCK(…)` — is
//!   state.
//! - Ambiguous text is state: a backslash anywhere (whether it escapes a
//!   quote depends on `NO_BACKSLASH_ESCAPES`), an executable comment
//!   (`/*! … */`, `/*M! … */`, which the server runs), a nested or
//!   unterminated comment, an unterminated literal or quoted identifier, a
//!   NUL byte, and any byte above 0x7f outside a `'…'` or `"…"` literal (in
//!   GBK, Big5 or SJIS a multi-byte character can end in a backtick).
//!
//! The relay ([`crate::relay`]) also requires the session to end with
//! every command answered, outside a transaction (the server's last status
//! without `SERVER_STATUS_IN_TRANS`), never reporting
//! `SERVER_SESSION_STATE_CHANGED`, on a connection whose login left
//! autocommit on.
//!
//! What bytes cannot show: a view that calls a stored function changing
//! session state when a plain `SELECT` reads it. Only clients sharing the
//! same upstream credential share a pooled connection, and each could run
//! that SQL itself; routes whose database holds such views set
//! `pool.reset = "always"`. What a `SELECT` leaves that the next client
//! could read (the warning list of the last statement, `FOUND_ROWS()`)
//! stays within that credential too.

use warden_core::sql_tokens::{is_one_of, Recent, Token};

/// Built-in functions present in MySQL 5.7+ and MariaDB 10+ that change no
/// session state; a `SELECT` calling only these (and keyword forms such as
/// `IN (…)`, `EXISTS (…)`, `CAST(… AS CHAR(10))`) stays state-free.
const PURE: &[&str] = &[
    "abs",
    "avg",
    "cast",
    "ceil",
    "ceiling",
    "char",
    "char_length",
    "coalesce",
    "concat",
    "concat_ws",
    "connection_id",
    "convert",
    "count",
    "curdate",
    "current_date",
    "current_timestamp",
    "current_user",
    "database",
    "date",
    "date_add",
    "date_format",
    "date_sub",
    "datediff",
    "decimal",
    "field",
    "find_in_set",
    "floor",
    "from_unixtime",
    "greatest",
    "group_concat",
    "hex",
    "if",
    "ifnull",
    "instr",
    "is_free_lock",
    "is_used_lock",
    "isnull",
    "lcase",
    "least",
    "left",
    "length",
    "locate",
    "lower",
    "lpad",
    "ltrim",
    "max",
    "md5",
    "min",
    "mod",
    "now",
    "nullif",
    "replace",
    "right",
    "round",
    "rpad",
    "rtrim",
    "sha1",
    "substr",
    "substring",
    "substring_index",
    "sum",
    "trim",
    "truncate",
    "ucase",
    "unhex",
    "unix_timestamp",
    "upper",
    "user",
    "utc_timestamp",
    "version",
    "year",
];

/// Keywords that may stand before `(` without being a function call.
const PAREN_KEYWORDS: &[&str] = &[
    "against", "all", "and", "any", "as", "between", "by", "case", "distinct", "div", "else",
    "exists", "force", "from", "having", "ignore", "in", "index", "is", "join", "key", "like",
    "match", "not", "on", "or", "over", "regexp", "rlike", "select", "some", "then", "union",
    "use", "using", "when", "where", "xor",
];

/// Words that make a `SELECT` state: `INTO` (a variable, a file) and the
/// sequence forms (`NEXT VALUE FOR s`, `PREVIOUS VALUE FOR s`, and the
/// functions, which set the session's last value).
const STATE_WORDS: &[&str] = &["into", "next", "previous", "nextval", "lastval", "setval"];

/// Splits `sql` into tokens, handing each to `each` (false stops); false
/// when `each` stopped or the text is ambiguous or malformed (see the
/// module documentation). Allocates nothing.
fn lex<'a>(sql: &'a [u8], mut each: impl FnMut(Token<'a>) -> bool) -> bool {
    lex_inner(sql, &mut each).is_some()
}

fn lex_inner<'a>(sql: &'a [u8], each: &mut impl FnMut(Token<'a>) -> bool) -> Option<()> {
    let mut push = |t: Token<'a>| each(t).then_some(());
    let word_byte = |b: u8| b.is_ascii_alphanumeric() || b == b'_' || b == b'$';
    let mut i = 0;
    while i < sql.len() {
        let b = sql[i];
        match b {
            0 | b'\\' | 0x80.. => return None,
            b' ' | b'\t' | b'\n' | b'\r' | 0x0b | 0x0c => i += 1,
            // `#` and `-- ` comments run to the end of the line (taken as
            // ending at either line-break byte: the shorter reading).
            b'#' => i = line_end(sql, i),
            b'-' if sql.get(i + 1) == Some(&b'-') && sql.get(i + 2).is_none_or(|c| *c <= b' ') => {
                i = line_end(sql, i)
            }
            b'/' if sql.get(i + 1) == Some(&b'*') => {
                let body = &sql[i + 2..];
                if body.starts_with(b"!") || body.starts_with(b"M!") || body.starts_with(b"m!") {
                    return None;
                }
                let close = body.windows(2).position(|w| w == b"*/")?;
                if body[..close].windows(2).any(|w| w == b"/*") {
                    return None;
                }
                i += 2 + close + 2;
            }
            b'\'' => {
                i = quoted_end(sql, i + 1, b'\'', true)?;
                push(Token::Literal)?;
            }
            b'"' | b'`' => {
                i = quoted_end(sql, i + 1, b, b == b'"')?;
                push(Token::Quoted)?;
            }
            b'0'..=b'9' => {
                while i < sql.len() && (word_byte(sql[i]) || sql[i] == b'.') {
                    i += 1;
                }
                push(Token::Literal)?;
            }
            _ if word_byte(b) => {
                let start = i;
                while i < sql.len() && word_byte(sql[i]) {
                    i += 1;
                }
                push(Token::Word(&sql[start..i]))?;
            }
            _ => {
                push(Token::Punct(b))?;
                i += 1;
            }
        }
    }
    Some(())
}

/// The offset of the line break ending a comment that starts at `i` (or
/// the end of the text).
fn line_end(sql: &[u8], i: usize) -> usize {
    sql[i..]
        .iter()
        .position(|&c| c == b'\n' || c == b'\r')
        .map_or(sql.len(), |p| i + p)
}

/// The offset after the closing `quote` of a literal or identifier whose
/// body starts at `i` (a doubled quote stands for itself); None when it is
/// unterminated, or holds a byte above 0x7f where `high_ok` is false.
fn quoted_end(sql: &[u8], mut i: usize, quote: u8, high_ok: bool) -> Option<usize> {
    while i < sql.len() {
        match sql[i] {
            c if c == quote && sql.get(i + 1) == Some(&quote) => i += 2,
            c if c == quote => return Some(i + 1),
            0x80.. if !high_ok => return None,
            _ => i += 1,
        }
    }
    None
}

/// True when running `sql` (a `COM_QUERY`'s text) can leave no session
/// state behind (see the module docs).
pub fn sql_is_state_free(sql: &[u8]) -> bool {
    let mut stmt = Statement::default();
    lex(sql, |t| stmt.feed(t))
}

/// The state-free check of one statement after another, token by token.
#[derive(Default)]
struct Statement<'a> {
    /// A `SELECT` or `SHOW` is being read (false: nothing yet).
    started: bool,
    /// The tokens before the current one, in this statement.
    recent: Recent<'a>,
}

impl<'a> Statement<'a> {
    /// False: the statement is not state-free.
    fn feed(&mut self, t: Token<'a>) -> bool {
        if t == Token::Punct(b';') {
            *self = Statement::default();
            return true;
        }
        let ok = match t {
            Token::Word(w) if !self.started => {
                self.started = w.eq_ignore_ascii_case(b"select") || w.eq_ignore_ascii_case(b"show");
                self.started
            }
            _ if !self.started => false,
            Token::Word(w) => !is_one_of(w, STATE_WORDS),
            // `:=` assigns a user variable (`:` has no other use here).
            Token::Punct(b':') => false,
            // A call of anything but a listed built-in (a word starting
            // with a digit is a Literal: `1evil()` is a call too).
            Token::Punct(b'(') => self.recent.call_ok(PURE, PAREN_KEYWORDS),
            _ => true,
        };
        self.recent.push(t);
        ok
    }
}

/// `COM_QUERY`.
const COM_QUERY: u8 = 0x03;
/// `COM_PING`.
const COM_PING: u8 = 0x0e;

/// True when a client command (its whole payload) leaves no session state.
pub fn command_is_state_free(payload: &[u8]) -> bool {
    match payload.split_first() {
        Some((&COM_QUERY, sql)) => sql_is_state_free(sql),
        Some((&COM_PING, rest)) => rest.is_empty(),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_selects_and_shows_are_state_free() {
        for sql in [
            "SELECT 1",
            "select c from sbtest1 where id = 51234",
            "SELECT COUNT(*), MAX(x) FROM t WHERE y IN (1, 2) AND EXISTS (SELECT 1 FROM u)",
            "SELECT 'it''s', \"a \"\" b\", `odd``name` FROM t",
            "SELECT 'caf\u{e9}' FROM t",
            "  # a comment\nSELECT /* note */ x FROM t -- trailing\n",
            "SELECT x FROM t WHERE email = 'a@b.c' FOR UPDATE",
            "SELECT @@version, @@session.sql_mode, @a",
            "SELECT CAST(x AS CHAR(10)), CONVERT(y USING utf8mb4) FROM t",
            "SELECT * FROM t FORCE INDEX (i) WHERE MATCH (a) AGAINST ('w')",
            "SELECT /*+ MAX_EXECUTION_TIME(1000) */ 1",
            "SELECT 1; SELECT 2;",
            "SHOW WARNINGS",
            "SHOW VARIABLES LIKE 'max%'",
            "SELECT 5 --1",
            "",
            ";",
        ] {
            assert!(sql_is_state_free(sql.as_bytes()), "{sql}");
        }
    }

    #[test]
    fn anything_that_can_leave_state_is_not() {
        for sql in [
            "SET @a = 1",
            "SET NAMES latin1",
            "SET autocommit = 0",
            "USE other",
            "BEGIN",
            "START TRANSACTION",
            "LOCK TABLES t READ",
            "CREATE TEMPORARY TABLE t (a int)",
            "PREPARE s FROM 'SELECT 1'",
            "HANDLER t OPEN",
            "CALL p()",
            "DO GET_LOCK('a', 1)",
            "INSERT INTO t VALUES (1)",
            "EXPLAIN ANALYZE SELECT 1",
            "(SELECT 1)",
            "SELECT GET_LOCK('a', 10)",
            "SELECT get_lock /* x */ ('a', 10)",
            "SELECT RELEASE_ALL_LOCKS()",
            "SELECT LAST_INSERT_ID(5)",
            "SELECT x INTO @v FROM t",
            "SELECT x FROM t INTO OUTFILE '/tmp/x'",
            "SELECT @a := 1",
            "SELECT @a:=1",
            "SELECT NEXT VALUE FOR s",
            "SELECT NEXTVAL(s)",
            "SELECT db.count(x) FROM t",
            "SELECT `count`(x) FROM t",
            "SELECT `db`.`f`()",
            "SELECT \"f\"()",
            "SELECT 1evil()",
            "SELECT my_function(1)",
            "SHOW STATUS WHERE get_lock('a', 1)",
            "SELECT 1; SET @a = 1",
            "SELECT 1 /*! , @a := 1 */",
            "SELECT 1 /*M!100000 , @a := 1 */",
            "SELECT 1 /* nested /* */ , @a := 1 */",
            // A backslash: the literal's end depends on NO_BACKSLASH_ESCAPES.
            "SELECT 'a\\', GET_LOCK('x', 1) -- '",
            "SELECT 'a\\'; SET @a = 1; -- '",
            "SELECT `name\u{e9}` FROM t",
            "SELECT x\u{e9} FROM t",
            "SELECT 'unterminated",
            "SELECT `unterminated",
            "SELECT /* unterminated",
            "SELECT 1\0; SET @a = 1",
            // A comment ended by a lone CR is read as ending there.
            "SELECT 1 # x\r, GET_LOCK('a', 1)",
        ] {
            assert!(!sql_is_state_free(sql.as_bytes()), "{sql}");
        }
    }

    #[test]
    fn commands() {
        assert!(command_is_state_free(b"\x03SELECT 1"));
        assert!(command_is_state_free(b"\x0e"));
        for p in [
            &b"\x03SET @a = 1"[..],
            b"\x02otherdb",
            b"\x16SELECT 1",
            b"\x1b\x00\x00",
            b"\x1f",
            b"\x11user",
            b"",
        ] {
            assert!(!command_is_state_free(p), "{p:?}");
        }
    }
}
