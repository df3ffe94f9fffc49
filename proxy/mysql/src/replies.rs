//! Where the server's replies end, for the kernel relay's quiet moment
//! (`route.kernel_relay`, see [`crate::relay`]): each command the client
//! sends queues the shape of its answer, and the server's packets are
//! walked against it — OK, ERR, text and binary result sets (with or
//! without `CLIENT_DEPRECATE_EOF`, several of them while the status says
//! `SERVER_MORE_RESULTS_EXISTS`), `COM_STMT_PREPARE`'s answer, and the
//! one-packet answers of `COM_PING`, `COM_INIT_DB` and the like.
//!
//! Conservative by design: a command whose answer is not parsed exactly
//! here (`COM_CHANGE_USER`, `COM_STMT_SEND_LONG_DATA`, `COM_STMT_FETCH` or
//! a cursor, binlog commands, ...), a `LOCAL INFILE` request, a packet of
//! 16 MiB or more either way, or anything unexpected makes the session
//! [`Replies::never`] eligible, for good.

use crate::packet::{Reader, MAX_PAYLOAD};
use std::collections::VecDeque;

/// Command bytes whose answers are tracked.
const COM_INIT_DB: u8 = 0x02;
const COM_QUERY: u8 = 0x03;
const COM_PROCESS_KILL: u8 = 0x0c;
const COM_PING: u8 = 0x0e;
const COM_STMT_PREPARE: u8 = 0x16;
pub const COM_STMT_EXECUTE: u8 = 0x17;
const COM_STMT_CLOSE: u8 = 0x19;
const COM_STMT_RESET: u8 = 0x1a;
const COM_SET_OPTION: u8 = 0x1b;
const COM_RESET_CONNECTION: u8 = 0x1f;

/// `SERVER_MORE_RESULTS_EXISTS`: another result follows this one.
const MORE_RESULTS: u16 = 0x0008;
/// `SERVER_STATUS_CURSOR_EXISTS`: rows wait for `COM_STMT_FETCH`.
const CURSOR_EXISTS: u16 = 0x0040;
/// `SERVER_STATUS_IN_TRANS`: a transaction is open.
pub const IN_TRANS: u16 = 0x0001;
/// `SERVER_STATUS_AUTOCOMMIT`.
pub const AUTOCOMMIT: u16 = 0x0002;
/// `SERVER_SESSION_STATE_CHANGED`: a session tracker saw state change.
pub const SESSION_STATE_CHANGED: u16 = 0x4000;

/// How many bytes of a `COM_STMT_EXECUTE` payload [`Replies::command`]
/// needs (command byte, statement id, flags).
pub const EXECUTE_HEAD: usize = 6;

/// Payload bytes kept of each server packet (an OK packet's status is at
/// most 1 + 9 + 9 bytes in).
const PREFIX: usize = 24;

/// The answer a command gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Shape {
    /// One packet (OK, ERR, EOF).
    One,
    /// OK, ERR or result sets (text or binary).
    Results,
    /// `COM_STMT_PREPARE`'s OK and definitions, or ERR.
    Prepare,
}

/// Where the reply to the oldest unanswered command stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    /// Its first packet (or the next result's) is due.
    Start,
    /// Column definitions left, then an EOF unless `DEPRECATE_EOF`.
    Columns(u64),
    ColumnsEof,
    Rows,
    /// Parameter definitions left (and the column count after).
    Params(u64, u64),
    ParamsEof(u64),
    /// A prepared statement's column definitions left.
    PrepColumns(u64),
    PrepColumnsEof,
}

/// Tracks server replies against client commands (see the module docs).
#[derive(Debug)]
pub struct Replies {
    deprecate_eof: bool,
    /// MariaDB progress reports (ERR packets with code 0xffff) may come
    /// before the answer.
    progress: bool,
    never: bool,
    /// Shapes of the answers still owed, oldest first.
    owed: VecDeque<Shape>,
    stage: Stage,
    /// Commands answered in full.
    answered: u64,
    /// The status flags of the last OK or EOF packet, and all of them
    /// or'ed together.
    last_status: u16,
    any_status: u16,
    // The server packet being read.
    header: [u8; 4],
    have: usize,
    remaining: usize,
    len: usize,
    prefix: [u8; PREFIX],
    kept: usize,
}

impl Replies {
    /// `deprecate_eof`: the session agreed `CLIENT_DEPRECATE_EOF`;
    /// `progress`: MariaDB's `CLIENT_PROGRESS`.
    pub fn new(deprecate_eof: bool, progress: bool) -> Replies {
        Replies {
            deprecate_eof,
            progress,
            never: false,
            owed: VecDeque::new(),
            stage: Stage::Start,
            answered: 0,
            last_status: AUTOCOMMIT,
            any_status: 0,
            header: [0; 4],
            have: 0,
            remaining: 0,
            len: 0,
            prefix: [0; PREFIX],
            kept: 0,
        }
    }

    /// The session can never be handed over.
    pub fn never(&self) -> bool {
        self.never
    }

    /// Rules the hand-over out for the session.
    pub fn set_never(&mut self) {
        self.never = true;
        self.owed.clear();
    }

    /// Commands answered in full so far.
    pub fn answered(&self) -> u64 {
        self.answered
    }

    /// The session is outside a transaction and no session tracker
    /// reported a change, as far as the server's status flags tell (a
    /// session that got no status yet counts as its login left it).
    pub fn left_clean(&self) -> bool {
        self.last_status & IN_TRANS == 0 && self.any_status & SESSION_STATE_CHANGED == 0
    }

    /// Every command is answered and the server's stream is at a packet
    /// boundary.
    pub fn quiet(&self) -> bool {
        !self.never
            && self.owed.is_empty()
            && self.stage == Stage::Start
            && self.have == 0
            && self.remaining == 0
    }

    /// A client command (at least its first [`EXECUTE_HEAD`] payload bytes
    /// for `COM_STMT_EXECUTE`, the command byte otherwise) of payload length
    /// `len` goes upstream.
    pub fn command(&mut self, head: &[u8], len: usize) {
        if self.never {
            return;
        }
        if len >= MAX_PAYLOAD {
            return self.set_never();
        }
        let shape = match head.first().copied() {
            Some(COM_QUERY) => Shape::Results,
            // Flags 0: no cursor (rows come at once, no COM_STMT_FETCH).
            Some(COM_STMT_EXECUTE) if head.len() >= EXECUTE_HEAD && head[5] == 0 => Shape::Results,
            Some(COM_STMT_PREPARE) => Shape::Prepare,
            Some(
                COM_PING | COM_INIT_DB | COM_RESET_CONNECTION | COM_STMT_RESET | COM_SET_OPTION
                | COM_PROCESS_KILL,
            ) => Shape::One,
            // Never answered.
            Some(COM_STMT_CLOSE) => return,
            _ => return self.set_never(),
        };
        self.owed.push_back(shape);
    }

    /// Bytes from the server, in order.
    pub fn feed(&mut self, mut data: &[u8]) {
        while !data.is_empty() && !self.never {
            if self.remaining > 0 {
                let n = self.remaining.min(data.len());
                let at = self.len - self.remaining;
                if at < PREFIX {
                    let k = n.min(PREFIX - at);
                    self.prefix[at..at + k].copy_from_slice(&data[..k]);
                    self.kept = at + k;
                }
                self.remaining -= n;
                data = &data[n..];
                if self.remaining == 0 {
                    self.packet();
                }
                continue;
            }
            self.header[self.have] = data[0];
            self.have += 1;
            data = &data[1..];
            if self.have == 4 {
                self.have = 0;
                let h = self.header;
                self.len = u32::from_le_bytes([h[0], h[1], h[2], 0]) as usize;
                self.remaining = self.len;
                self.kept = 0;
                if self.len >= MAX_PAYLOAD {
                    return self.set_never();
                }
                if self.len == 0 {
                    self.packet();
                }
            }
        }
    }

    /// One whole server packet (its first bytes in `prefix`).
    fn packet(&mut self) {
        let p = &self.prefix[..self.kept];
        let (len, first) = (self.len, p.first().copied());
        let Some(&shape) = self.owed.front() else {
            // Nothing asked for it.
            return self.set_never();
        };
        if first == Some(0xff) && self.progress && p.get(1..3) == Some(&[0xff, 0xff]) {
            // A progress report: the answer is still to come.
            return;
        }
        let eof = first == Some(0xfe) && len < 9;
        let status = match first {
            Some(0x00) if self.stage == Stage::Start && shape != Shape::Prepare => ok_status(p),
            Some(0xfe) if self.deprecate_eof && self.stage == Stage::Rows => ok_status(p),
            Some(0xfe) if eof => eof_status(p),
            _ => None,
        };
        if let Some(s) = status {
            self.last_status = s;
            self.any_status |= s;
        }
        let next = match (self.stage, shape) {
            (Stage::Start, Shape::One) => None,
            (Stage::Start, _) if first == Some(0xff) => None,
            (Stage::Start, Shape::Results) => match first {
                Some(0x00) => match ok_status(p) {
                    Some(s) if s & MORE_RESULTS != 0 => Some(Stage::Start),
                    Some(_) => None,
                    None => return self.set_never(),
                },
                // LOCAL INFILE, or anything else not a column count.
                Some(0xfb | 0xfe) | None => return self.set_never(),
                Some(_) => match Reader::new(p).lenenc_int() {
                    Ok(n) if n > 0 => Some(Stage::Columns(n)),
                    _ => return self.set_never(),
                },
            },
            (Stage::Start, Shape::Prepare) => {
                let mut r = Reader::new(p);
                let ok = (|| {
                    if r.u8()? != 0 {
                        return Err(crate::packet::Malformed("not OK".into()));
                    }
                    r.u32()?;
                    Ok((u64::from(r.u16()?), u64::from(r.u16()?)))
                })();
                match ok {
                    Ok((cols, params)) if params > 0 => Some(Stage::Params(params, cols)),
                    Ok((cols, _)) => self.prep_columns(cols),
                    Err(_) => return self.set_never(),
                }
            }
            (Stage::Columns(left), _) => Some(if left > 1 {
                Stage::Columns(left - 1)
            } else if self.deprecate_eof {
                Stage::Rows
            } else {
                Stage::ColumnsEof
            }),
            (Stage::ColumnsEof, _) => match eof_status(p) {
                Some(s) if eof && s & CURSOR_EXISTS == 0 => Some(Stage::Rows),
                _ => return self.set_never(),
            },
            (Stage::Rows, _) => match first {
                // An error ends the statement (no further results).
                Some(0xff) => None,
                Some(0xfe) if len < MAX_PAYLOAD => {
                    let status = if self.deprecate_eof {
                        ok_status(p)
                    } else if eof {
                        eof_status(p)
                    } else {
                        return self.set_never();
                    };
                    match status {
                        Some(s) if s & MORE_RESULTS != 0 => Some(Stage::Start),
                        Some(_) => None,
                        None => return self.set_never(),
                    }
                }
                _ => Some(Stage::Rows),
            },
            (Stage::Params(left, cols), _) => {
                if left > 1 {
                    Some(Stage::Params(left - 1, cols))
                } else if self.deprecate_eof {
                    self.prep_columns(cols)
                } else {
                    Some(Stage::ParamsEof(cols))
                }
            }
            (Stage::ParamsEof(cols), _) if eof => self.prep_columns(cols),
            (Stage::PrepColumns(left), _) => {
                if left > 1 {
                    Some(Stage::PrepColumns(left - 1))
                } else if self.deprecate_eof {
                    None
                } else {
                    Some(Stage::PrepColumnsEof)
                }
            }
            (Stage::PrepColumnsEof, _) if eof => None,
            (Stage::ParamsEof(_) | Stage::PrepColumnsEof, _) => return self.set_never(),
        };
        match next {
            Some(stage) => self.stage = stage,
            None => {
                self.stage = Stage::Start;
                self.owed.pop_front();
                self.answered += 1;
            }
        }
    }

    /// After a prepared statement's parameters: its columns, if any.
    fn prep_columns(&self, cols: u64) -> Option<Stage> {
        (cols > 0).then_some(Stage::PrepColumns(cols))
    }
}

/// The status flags of an OK packet (0x00 or 0xfe header).
pub(crate) fn ok_status(p: &[u8]) -> Option<u16> {
    let mut r = Reader::new(p);
    r.u8().ok()?;
    r.lenenc_int().ok()?;
    r.lenenc_int().ok()?;
    r.u16().ok()
}

/// The status flags of an EOF packet (0xfe, warnings, status).
pub(crate) fn eof_status(p: &[u8]) -> Option<u16> {
    let mut r = Reader::new(p);
    r.u8().ok()?;
    r.u16().ok()?;
    r.u16().ok()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::packet::put_packet;

    fn packet(seq: u8, payload: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        put_packet(&mut out, seq, payload);
        out
    }

    const OK: &[u8] = b"\0\0\0\x02\0\0\0";
    const OK_MORE: &[u8] = b"\0\0\0\x0a\0\0\0";
    const EOF: &[u8] = b"\xfe\0\0\x02\0";
    const EOF_MORE: &[u8] = b"\xfe\0\0\x0a\0";
    /// An OK with the 0xfe header (`DEPRECATE_EOF`'s end of rows).
    const OK_FE: &[u8] = b"\xfe\0\0\x02\0\0\0";
    const OK_FE_MORE: &[u8] = b"\xfe\0\0\x0a\0\0\0";
    const COL: &[u8] = b"\x03def\0\0\0\x011\0\x0c?\0\x01\0\0\0\x08\x81\0\0\0\0";

    /// Feeds `stream` in chunks of every size; the tracker must be quiet
    /// exactly at the end, with `answered` commands answered.
    fn walks(r: &Replies, stream: &[u8], answered: u64) {
        for step in 1..=stream.len().max(1) {
            let mut r = clone(r);
            for (i, chunk) in stream.chunks(step).enumerate() {
                r.feed(chunk);
                let last = (i + 1) * step >= stream.len();
                assert_eq!(r.quiet(), last, "step {step}, chunk {i}: {r:?}");
            }
            assert_eq!(r.answered(), answered, "step {step}");
        }
    }

    fn clone(r: &Replies) -> Replies {
        Replies {
            owed: r.owed.clone(),
            ..Replies::new(r.deprecate_eof, r.progress)
        }
    }

    fn with(deprecate_eof: bool, commands: &[&[u8]]) -> Replies {
        let mut r = Replies::new(deprecate_eof, true);
        for c in commands {
            r.command(c, c.len());
        }
        r
    }

    #[test]
    fn text_result_sets_with_and_without_eof() {
        let classic = [
            packet(1, b"\x01"),
            packet(2, COL),
            packet(3, EOF),
            packet(4, b"\x011"),
            packet(5, b"\x012"),
            packet(6, EOF),
        ]
        .concat();
        walks(&with(false, &[b"\x03SELECT 1"]), &classic, 1);
        let deprecated = [
            packet(1, b"\x01"),
            packet(2, COL),
            packet(3, b"\x011"),
            packet(4, OK_FE),
        ]
        .concat();
        walks(&with(true, &[b"\x03SELECT 1"]), &deprecated, 1);
    }

    #[test]
    fn the_last_status_tells_an_open_transaction() {
        // BEGIN's OK says IN_TRANS, COMMIT's does not.
        let in_trans: &[u8] = b"\0\0\0\x03\0\0\0";
        let mut r = with(true, &[b"\x03BEGIN", b"\x03COMMIT"]);
        assert!(r.left_clean(), "nothing read yet");
        r.feed(&packet(1, in_trans));
        assert!(!r.left_clean());
        r.feed(&packet(1, OK));
        assert!(r.left_clean() && r.quiet());
        // A row set's end (classic EOF and the 0xfe OK) carries it too.
        for (deprecate_eof, end) in [
            (false, b"\xfe\0\0\x03\0".as_slice()),
            (true, b"\xfe\0\0\x03\0\0\0"),
        ] {
            let mut r = with(deprecate_eof, &[b"\x03SELECT 1"]);
            let mut stream = [packet(1, b"\x01"), packet(2, COL)].concat();
            if !deprecate_eof {
                stream.extend(packet(3, EOF));
            }
            stream.extend(packet(4, b"\x011"));
            stream.extend(packet(5, end));
            r.feed(&stream);
            assert!(
                r.quiet() && !r.left_clean(),
                "deprecate_eof {deprecate_eof}"
            );
        }
        // A session tracker's report stays, whatever follows.
        let mut r = with(true, &[b"\x03SELECT 1", b"\x0e"]);
        r.feed(&packet(1, b"\0\0\0\x02\x40\0\0"));
        r.feed(&packet(1, OK));
        assert!(r.quiet() && !r.left_clean());
        // A binary row starts with 0x00: not a status.
        let mut r = with(true, &[b"\x17\x01\0\0\0\0\x01\0\0\0"]);
        r.feed(
            &[
                packet(1, b"\x01"),
                packet(2, COL),
                packet(3, b"\0\0\x03\0\0\0"),
                packet(4, OK_FE),
            ]
            .concat(),
        );
        assert!(r.quiet() && r.left_clean());
    }

    #[test]
    fn multi_results_end_with_the_last() {
        // SELECT 1; UPDATE ...; SELECT 2 (more-results set on all but the last).
        let stream = [
            packet(1, b"\x01"),
            packet(2, COL),
            packet(3, b"\x011"),
            packet(4, OK_FE_MORE),
            packet(5, OK_MORE),
            packet(6, b"\x01"),
            packet(7, COL),
            packet(8, b"\x012"),
            packet(9, OK_FE),
        ]
        .concat();
        walks(&with(true, &[b"\x03SELECT 1; DO 1; SELECT 2"]), &stream, 1);
        let classic = [
            packet(1, b"\x01"),
            packet(2, COL),
            packet(3, EOF),
            packet(4, b"\x011"),
            packet(5, EOF_MORE),
            packet(6, OK),
        ]
        .concat();
        walks(&with(false, &[b"\x03CALL p()"]), &classic, 1);
        // An error ends the statement, whatever came before.
        let err = [packet(1, OK_MORE), packet(2, b"\xff\x28\x04#42000oops")].concat();
        walks(&with(true, &[b"\x03DO 1; BAD"]), &err, 1);
    }

    #[test]
    fn pipelined_commands_and_one_packet_answers() {
        let stream = [
            packet(1, OK),
            packet(1, OK),
            packet(1, b"\xff\x19\x04#42000no"),
            packet(1, b"\xff\xff\xff\x01\x00\x01stage"),
            packet(1, OK),
        ]
        .concat();
        // The close is never answered; the progress report is no answer.
        let r = with(
            true,
            &[
                b"\x0e",
                b"\x02db",
                b"\x19\x01\0\0\0",
                b"\x03BAD",
                b"\x03DO 1",
            ],
        );
        walks(&r, &stream, 4);
    }

    #[test]
    fn prepared_statements() {
        // Prepare: 1 column, 2 parameters.
        let prep_ok = b"\0\x01\0\0\0\x01\0\x02\0\0\0\0";
        let classic = [
            packet(1, prep_ok),
            packet(2, COL),
            packet(3, COL),
            packet(4, EOF),
            packet(5, COL),
            packet(6, EOF),
        ]
        .concat();
        walks(&with(false, &[b"\x16SELECT ?+?"]), &classic, 1);
        let deprecated = [
            packet(1, prep_ok),
            packet(2, COL),
            packet(3, COL),
            packet(4, COL),
        ]
        .concat();
        walks(&with(true, &[b"\x16SELECT ?+?"]), &deprecated, 1);
        // Execute (flags 0): a binary result set.
        let exec = b"\x17\x01\0\0\0\0\x01\0\0\0";
        let rows = [
            packet(1, b"\x01"),
            packet(2, COL),
            packet(3, b"\0\0\x02"),
            packet(4, OK_FE),
        ]
        .concat();
        walks(&with(true, &[exec]), &rows, 1);
        let mut r = with(true, &[b"\x17\x01\0\0\0\x01\x01\0\0\0"]);
        assert!(r.never(), "a cursor is not tracked");
        r.feed(&rows);
        assert!(!r.quiet());
    }

    #[test]
    fn anything_else_rules_the_session_out() {
        for cmd in [
            &b"\x11root\0"[..],
            b"\x18\x01\0\0\0\0\0data",
            b"\x1c\x01\0\0\0\x01\0\0\0",
            b"\x12\0\0\0\0",
            b"\x17\x01\0",
        ] {
            assert!(with(true, &[cmd]).never(), "{cmd:?}");
        }
        // A LOCAL INFILE request.
        let mut r = with(true, &[b"\x03LOAD DATA LOCAL INFILE 'x' INTO TABLE t"]);
        r.feed(&packet(1, b"\xfbx"));
        assert!(r.never() && !r.quiet());
        // A packet nobody asked for.
        let mut r = with(true, &[]);
        r.feed(&packet(1, OK));
        assert!(r.never());
        // A 16 MiB packet.
        let mut r = with(true, &[b"\x03SELECT 1"]);
        r.feed(&[0xff, 0xff, 0xff, 1]);
        assert!(r.never());
        let mut r = with(true, &[]);
        r.command(b"\x03", MAX_PAYLOAD);
        assert!(r.never());
    }
}
