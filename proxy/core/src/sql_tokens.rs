//! What the PostgreSQL and MySQL pools' state-free checks share (each
//! dialect has its own lexer: `warden_postgres::session_state`,
//! `warden_mysql::session_state`): the tokens a lexer emits, and the rule
//! that a `(` is a function call unless it follows a keyword.

/// One token of SQL text, as a state-free check needs to see it.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Token<'a> {
    /// An unquoted word (keyword or identifier), as written.
    Word(&'a [u8]),
    /// A quoted identifier (or a string the dialect may read as one).
    Quoted,
    /// A string literal, a number, a parameter.
    Literal,
    Punct(u8),
}

/// `word` is one of `list` (ASCII case-insensitive).
pub fn is_one_of(word: &[u8], list: &[&str]) -> bool {
    list.iter().any(|k| word.eq_ignore_ascii_case(k.as_bytes()))
}

/// The two tokens before the current one in a statement, for the rule on
/// `(` ([`Recent::call_ok`]).
#[derive(Default)]
pub struct Recent<'a> {
    prev: Option<Token<'a>>,
    prev2: Option<Token<'a>>,
}

impl<'a> Recent<'a> {
    /// `t` was read.
    pub fn push(&mut self, t: Token<'a>) {
        self.prev2 = self.prev;
        self.prev = Some(t);
    }

    /// A `(` comes next: true when it follows punctuation or nothing, a
    /// keyword of `keywords`, or an unqualified function name of `pure`;
    /// false after any other word, a schema-qualified name (`db.f(`), a
    /// quoted name or a literal (a word starting with a digit, in MySQL).
    pub fn call_ok(&self, pure: &[&str], keywords: &[&str]) -> bool {
        match self.prev {
            Some(Token::Word(w)) => {
                let qualified = self.prev2 == Some(Token::Punct(b'.'));
                !qualified && (is_one_of(w, pure) || is_one_of(w, keywords))
            }
            Some(Token::Quoted | Token::Literal) => false,
            Some(Token::Punct(_)) | None => true,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_paren_is_a_call_unless_a_listed_name_or_keyword_stands_before_it() {
        let after = |tokens: &[Token<'static>]| {
            let mut r = Recent::default();
            for t in tokens {
                r.push(*t);
            }
            r.call_ok(&["count"], &["in"])
        };
        assert!(after(&[]));
        assert!(after(&[Token::Punct(b',')]));
        assert!(after(&[Token::Word(b"COUNT")]));
        assert!(after(&[Token::Word(b"In")]));
        assert!(!after(&[Token::Word(b"get_lock")]));
        assert!(!after(&[
            Token::Word(b"db"),
            Token::Punct(b'.'),
            Token::Word(b"count")
        ]));
        assert!(!after(&[Token::Quoted]));
        assert!(!after(&[Token::Literal]));
    }
}
