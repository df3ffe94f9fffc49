//! A spliced session's client commands that reach warden (the kernel
//! relay's `GUARD_REDIS`). The kernel redirects a client's RESP elements one
//! at a time after reading each command's name, and hands the direction to
//! warden's socket at an element boundary before an `AUTH`, `HELLO` or
//! `RESET`, a command not in canonical form (an inline one), or an element
//! past its window. From there [`SplicedCommands`] walks the bytes: a
//! command's name is read before any of it goes on, so
//!
//! - `AUTH …` is replaced by warden's own `AUTH` for the route's login (the
//!   server's `+OK` reaches the client as warden's local answer would in
//!   user space; the client's password goes nowhere);
//! - `HELLO …` goes on with its `AUTH` pair replaced by warden's login, as in
//!   user space;
//! - `RESET` ends the session with an error: it logs the connection out, and
//!   logging in again would put warden's own reply among the server's,
//!   which go straight to the client;
//! - everything else, and the rest of a command the kernel had started,
//!   goes on unchanged (an inline command re-encoded as an array).
//!
//! Malformed RESP ends the session with Redis' own protocol error.

use crate::relay::{hello, ClientState, CommandPolicy, Context};
use crate::resp::{
    error_reply, parse_command, Command, ProtocolError, MAX_ARGS, MAX_BULK, MAX_INLINE,
};
use warden_core::kernel_relay::Fed;
use zeroize::Zeroizing;

/// Longest command warden reads whole (an `AUTH`, `HELLO` or `RESET`, or an
/// inline command).
const MAX_WHOLE: usize = MAX_INLINE;

/// Longest `*<count>` or `$<len>` line, CRLF included (a length has at
/// most 20 digits).
const MAX_LINE: usize = 64;

/// Longest command name read to check a route's command list (Redis'
/// longest has 20 bytes; a longer one is in no list).
const MAX_NAME: usize = 64;

/// The names the kernel looks up for a route's command list
/// (`KernelRelay::set_command_list`), upper case: for a deny list, every
/// command a rule names (`CONFIG|SET` names `CONFIG`: the route's relay
/// decides the subcommand); for an allow list, the commands it allows
/// whole (any other goes to the relay, which refuses or checks its
/// subcommand). `None`: the route has no list.
pub fn command_list_names(policy: &CommandPolicy) -> Option<Vec<String>> {
    let mut names: Vec<String> = match &policy.allow {
        Some(allow) => allow.iter().filter(|e| !e.contains('|')).cloned().collect(),
        None if policy.deny.is_empty() => return None,
        None => policy
            .deny
            .iter()
            .map(|e| e.split('|').next().unwrap_or(e).to_string())
            .collect(),
    };
    names.sort();
    names.dedup();
    Some(names)
}

/// Where the walk stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum At {
    /// A command starts.
    Command,
    /// A bulk string's `$<len>` line, from `held[line_from..]`.
    Header,
    /// A command's name (`len` bytes) being read into `held`, up to `need`
    /// bytes with its CRLF.
    Name { need: usize, len: usize },
    /// `held` is one whole command being read (a name warden handles, or an
    /// inline command).
    Whole,
    /// Inside a bulk string: this many bytes (with its CRLF) to pass on.
    Bulk(usize),
}

/// The walk of a spliced Redis client's bytes (see the module docs).
pub struct SplicedCommands {
    at: At,
    /// Bulk strings left in the current command.
    left: u64,
    /// A command's start or a header line, held until it is decided.
    held: Zeroizing<Vec<u8>>,
    /// Where the header line being read starts in `held`.
    line_from: usize,
    /// The command's name comes next (its array header is in `held`).
    naming: bool,
    state: ClientState,
    route: String,
    workload: String,
    user: String,
    password: Zeroizing<Vec<u8>>,
    refused: u64,
    /// The route's command list, if it has one.
    listed: Option<CommandPolicy>,
}

impl SplicedCommands {
    pub fn new(route: &str, workload: &str, user: &str, password: &[u8]) -> SplicedCommands {
        SplicedCommands {
            at: At::Command,
            left: 0,
            held: Zeroizing::new(Vec::new()),
            line_from: 0,
            naming: false,
            state: ClientState::default(),
            route: route.to_string(),
            workload: workload.to_string(),
            user: user.to_string(),
            password: Zeroizing::new(password.to_vec()),
            refused: 0,
            listed: None,
        }
    }

    /// The route's command list (see [`command_list_names`]).
    pub fn with_list(self, policy: &CommandPolicy) -> SplicedCommands {
        let listed = (!policy.deny.is_empty() || policy.allow.is_some()).then(|| policy.clone());
        SplicedCommands { listed, ..self }
    }

    fn protocol_error(&self, e: &ProtocolError, local: &mut Vec<u8>) -> Fed {
        tracing::warn!(route = %self.route, "spliced session: {e}");
        local.extend_from_slice(&error_reply("ERR", &format!("Protocol error: {e}")));
        Fed::End
    }

    /// With the route's command list: the kernel relay hands the session
    /// back to user space before this command (the route's relay decides
    /// it, subcommand rules included). The same rule as the kernel's
    /// (`command_list_names`): a deny list's commands, any command an
    /// allow list does not allow whole.
    fn hands_back(&self, name: &[u8]) -> bool {
        let Some(list) = &self.listed else {
            return false;
        };
        let name = String::from_utf8_lossy(name).to_ascii_uppercase();
        match &list.allow {
            Some(allow) => !allow.contains(&name),
            None => list
                .deny
                .iter()
                .any(|e| e.split('|').next() == Some(name.as_str())),
        }
    }

    /// A whole command in `held`: handled, or the session ends.
    fn whole_command(&mut self, cmd: &Command, up: &mut Vec<u8>, local: &mut Vec<u8>) -> bool {
        let raw: &[u8] = &self.held;
        let name = cmd.arg(raw, 0).unwrap_or_default();
        let ctx = Context {
            route: &self.route,
            workload: &self.workload,
            policy: &Default::default(),
            user: &self.user,
            password: &self.password,
        };
        if name.eq_ignore_ascii_case(b"AUTH") {
            ctx.auth_command(up);
        } else if name.eq_ignore_ascii_case(b"HELLO") {
            hello(raw, cmd, &mut self.state, up, &ctx);
        } else if name.eq_ignore_ascii_case(b"RESET") {
            self.refused += 1;
            local.extend_from_slice(&error_reply(
                "ERR",
                &format!(
                    "warden: RESET in a session of route {:?} that warden handed to the kernel \
                     relay; the session ends: reconnect (or set kernel_relay = false on the route)",
                    self.route
                ),
            ));
            return false;
        } else if !cmd.args.is_empty() {
            crate::resp::encode_command(up, cmd.args.iter().map(|r| &raw[r.clone()]));
        }
        true
    }
}

/// `$<len>\r\n` or `*<count>\r\n` as the server reads it: digits, no sign,
/// no leading zero (anything else is refused, never guessed at; the callers
/// also refuse what the server refuses: more than `MAX_ARGS` arguments, a
/// bulk string over `MAX_BULK`).
fn length(line: &[u8], kind: u8) -> Option<u64> {
    let digits = line.strip_prefix(&[kind])?.strip_suffix(b"\r\n")?;
    let ok = !digits.is_empty()
        && digits.len() <= 10
        && digits.iter().all(u8::is_ascii_digit)
        && (digits[0] != b'0' || digits.len() == 1);
    ok.then(|| {
        digits
            .iter()
            .fold(0u64, |n, d| n * 10 + u64::from(d - b'0'))
    })
}

/// Names warden reads a whole command for.
fn is_wardens(name: &[u8]) -> bool {
    [&b"AUTH"[..], b"HELLO", b"RESET"]
        .iter()
        .any(|n| name.eq_ignore_ascii_case(n))
}

impl warden_core::kernel_relay::ClientGuard for SplicedCommands {
    fn kernel(&self) -> u8 {
        warden_ebpf::GUARD_REDIS
    }

    fn resume(&mut self, at: warden_ebpf::ClientPosition) {
        self.left = u64::from(at.args);
        self.at = if at.args > 0 { At::Header } else { At::Command };
        self.line_from = 0;
    }

    fn feed(&mut self, mut data: &[u8], up: &mut Vec<u8>, local: &mut Vec<u8>) -> Fed {
        loop {
            match self.at {
                At::Whole => {
                    let room = (MAX_WHOLE + 1).saturating_sub(self.held.len());
                    let k = data.len().min(room);
                    self.held.extend_from_slice(&data[..k]);
                    let mut cmd = Command::default();
                    match parse_command(&self.held, &mut cmd) {
                        Ok(true) => {
                            // What came after the command is walked next.
                            let rest = self.held.len() - cmd.len;
                            data = &data[k - rest..];
                            self.held.truncate(cmd.len);
                            if self.hands_back(cmd.arg(&self.held, 0).unwrap_or_default()) {
                                // What was read of the rest goes back too.
                                let mut rest = std::mem::take(&mut *self.held);
                                rest.extend_from_slice(data);
                                return Fed::Unsplice(rest);
                            }
                            if !self.whole_command(&cmd, up, local) {
                                return Fed::End;
                            }
                            self.held.clear();
                            self.line_from = 0;
                            self.left = 0;
                            self.at = At::Command;
                        }
                        Ok(false) if self.held.len() <= MAX_WHOLE => return Fed::Go,
                        Ok(false) => {
                            return self.protocol_error(&ProtocolError::InlineTooLong, local)
                        }
                        Err(e) => return self.protocol_error(&e, local),
                    }
                }
                _ if data.is_empty() => return Fed::Go,
                At::Bulk(n) => {
                    let k = n.min(data.len());
                    // The bulk string's CRLF, checked before it goes on (as
                    // in user space; the server would skip any two bytes).
                    let bad = (0..k).find(|&i| match n - i {
                        2 => data[i] != b'\r',
                        1 => data[i] != b'\n',
                        _ => false,
                    });
                    if let Some(i) = bad {
                        up.extend_from_slice(&data[..i]);
                        return self.protocol_error(&ProtocolError::MissingCrlf, local);
                    }
                    up.extend_from_slice(&data[..k]);
                    data = &data[k..];
                    self.at = match n - k {
                        0 if self.left > 0 => At::Header,
                        0 => At::Command,
                        rest => At::Bulk(rest),
                    };
                }
                At::Name { need, len } => {
                    let k = (need - self.held.len()).min(data.len());
                    self.held.extend_from_slice(&data[..k]);
                    data = &data[k..];
                    if self.held.len() < need {
                        continue;
                    }
                    self.naming = false;
                    if &self.held[need - 2..need] != b"\r\n" {
                        return self.protocol_error(&ProtocolError::MissingCrlf, local);
                    }
                    let name = &self.held[need - 2 - len..need - 2];
                    if is_wardens(name) {
                        // `held` is the command's start: read it whole.
                        self.at = At::Whole;
                        continue;
                    }
                    if self.hands_back(name) {
                        // The route's relay decides: from the command's
                        // start, with everything read after it.
                        let mut rest = std::mem::take(&mut *self.held);
                        rest.extend_from_slice(data);
                        return Fed::Unsplice(rest);
                    }
                    up.extend_from_slice(&self.held);
                    self.held.clear();
                    self.line_from = 0;
                    self.left -= 1;
                    self.at = if self.left > 0 {
                        At::Header
                    } else {
                        At::Command
                    };
                }
                At::Command if self.held.is_empty() && data[0] != b'*' => {
                    // An inline command.
                    self.at = At::Whole;
                }
                At::Command | At::Header => {
                    // One line: `*<count>\r\n` or `$<len>\r\n`, at most
                    // MAX_LINE bytes wherever the reads cut it.
                    let room = MAX_LINE - (self.held.len() - self.line_from);
                    let window = &data[..data.len().min(room)];
                    let (whole_line, k) = match window.iter().position(|&b| b == b'\n') {
                        Some(i) => (true, i + 1),
                        None => (false, window.len()),
                    };
                    self.held.extend_from_slice(&data[..k]);
                    data = &data[k..];
                    if !whole_line {
                        if self.held.len() - self.line_from >= MAX_LINE {
                            return self.protocol_error(&ProtocolError::HeaderTooLong, local);
                        }
                        continue;
                    }
                    let line = &self.held[self.line_from..];
                    if self.at == At::Command {
                        match length(line, b'*').filter(|&n| n <= MAX_ARGS as u64) {
                            None => return self.protocol_error(&ProtocolError::ArrayLength, local),
                            Some(0) => {
                                up.extend_from_slice(&self.held);
                                self.held.clear();
                                self.line_from = 0;
                            }
                            Some(count) => {
                                self.left = count;
                                self.naming = true;
                                self.at = At::Header;
                                self.line_from = self.held.len();
                            }
                        }
                        continue;
                    }
                    let Some(len) = length(line, b'$').filter(|&n| n <= MAX_BULK as u64) else {
                        return self.protocol_error(&ProtocolError::BulkLength, local);
                    };
                    let len = usize::try_from(len).unwrap_or(usize::MAX - 2);
                    if self.naming && (len <= 5 || (self.listed.is_some() && len <= MAX_NAME)) {
                        // Short enough to be one of warden's, or a route
                        // with a command list: the name decides, so it is
                        // read (with its CRLF) first.
                        self.at = At::Name {
                            need: self.held.len() + len + 2,
                            len,
                        };
                        continue;
                    }
                    if self.naming && self.listed.as_ref().is_some_and(|l| l.allow.is_some()) {
                        // A name longer than any command: not in an allow
                        // list, so its relay refuses it.
                        let mut rest = std::mem::take(&mut *self.held);
                        rest.extend_from_slice(data);
                        return Fed::Unsplice(rest);
                    }
                    self.naming = false;
                    up.extend_from_slice(&self.held);
                    self.held.clear();
                    self.line_from = 0;
                    self.left -= 1;
                    self.at = At::Bulk(len + 2);
                }
            }
        }
    }

    fn refused(&self) -> u64 {
        self.refused
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use warden_core::kernel_relay::{ClientGuard, Fed};
    use warden_ebpf::ClientPosition;

    fn cmd(args: &[&[u8]]) -> Vec<u8> {
        let mut out = Vec::new();
        crate::resp::encode_command(&mut out, args.iter().copied());
        out
    }

    /// Feeds `stream` in chunks of `step`; what went up, what warden
    /// answered, and whether the session goes on.
    fn walk(g: &mut SplicedCommands, stream: &[u8], step: usize) -> (Vec<u8>, Vec<u8>, bool) {
        let (mut up, mut local) = (Vec::new(), Vec::new());
        for chunk in stream.chunks(step) {
            if g.feed(chunk, &mut up, &mut local) != Fed::Go {
                return (up, local, false);
            }
        }
        (up, local, true)
    }

    /// Feeds `stream` in chunks of `step` until the guard hands the
    /// session back: what went up before, and the bytes handed back with
    /// the rest of the stream.
    fn walk_to_unsplice(g: &mut SplicedCommands, stream: &[u8], step: usize) -> (Vec<u8>, Vec<u8>) {
        let (mut up, mut local) = (Vec::new(), Vec::new());
        for (i, chunk) in stream.chunks(step).enumerate() {
            match g.feed(chunk, &mut up, &mut local) {
                Fed::Go => {}
                Fed::Unsplice(mut rest) => {
                    rest.extend_from_slice(&stream[((i + 1) * step).min(stream.len())..]);
                    assert!(local.is_empty());
                    return (up, rest);
                }
                Fed::End => panic!("ended: {}", String::from_utf8_lossy(&local)),
            }
        }
        panic!("never handed back");
    }

    #[test]
    fn a_listed_command_hands_the_session_back_from_its_start_at_any_split() {
        let deny = CommandPolicy::new(Some(&["config|set".to_string(), "KEYS".to_string()]), None);
        let allow = CommandPolicy::new(
            None,
            Some(&["GET".to_string(), "client|setname".to_string()]),
        );
        let head = [cmd(&[b"GET", b"k"]), cmd(&[b"GET", b"k2"])].concat();
        for (policy, listed) in [
            (&deny, cmd(&[b"Config", b"GET", b"x"])),
            (&deny, cmd(&[b"keys", b"*"])),
            (&allow, cmd(&[b"SET", b"k", b"v"])),
            (&allow, cmd(&[b"CLIENT", b"SETNAME", b"n"])),
            (&allow, b"SET k v\r\n".to_vec()),
        ] {
            let tail = cmd(&[b"GET", b"after"]);
            let stream = [head.clone(), listed.clone(), tail.clone()].concat();
            for step in 1..=stream.len() {
                let mut g = guard().with_list(policy);
                g.resume(ClientPosition::default());
                let (up, rest) = walk_to_unsplice(&mut g, &stream, step);
                assert_eq!(up, head, "step {step}");
                assert_eq!(rest, [listed.clone(), tail.clone()].concat(), "step {step}");
            }
        }
        // What a deny list does not name, and what an allow list allows
        // whole, go on in the kernel's stead.
        let stream = [cmd(&[b"CONFIGX"]), cmd(&[b"get", b"k"])].concat();
        for policy in [&deny, &allow] {
            let mut g = guard().with_list(policy);
            g.resume(ClientPosition::default());
            if policy.allow.is_some() {
                let (up, rest) = walk_to_unsplice(&mut g, &stream, 3);
                assert!(up.is_empty());
                assert_eq!(rest, stream);
            } else {
                let (up, local, go_on) = walk(&mut g, &stream, 3);
                assert!(go_on && local.is_empty());
                assert_eq!(up, stream);
            }
        }
    }

    #[test]
    fn the_kernel_looks_up_what_the_walk_hands_back() {
        let deny = CommandPolicy::new(
            Some(&[
                "config|set".to_string(),
                "KEYS".to_string(),
                "CONFIG".to_string(),
            ]),
            None,
        );
        assert_eq!(
            command_list_names(&deny),
            Some(vec!["CONFIG".to_string(), "KEYS".to_string()])
        );
        let allow = CommandPolicy::new(
            None,
            Some(&["get".to_string(), "client|setname".to_string()]),
        );
        assert_eq!(command_list_names(&allow), Some(vec!["GET".to_string()]));
        assert_eq!(command_list_names(&CommandPolicy::default()), None);
    }

    fn guard() -> SplicedCommands {
        SplicedCommands::new("r", "w", "app", b"s3cret")
    }

    #[test]
    fn wardens_commands_are_rewritten_or_end_the_session_at_any_split() {
        let stream = [
            cmd(&[b"SET", b"k", b"v"]),
            cmd(&[b"auth", b"client-pw"]),
            cmd(&[b"GET", b"k"]),
            cmd(&[b"Hello", b"3", b"AUTH", b"u", b"client-pw"]),
            b"PING\r\n".to_vec(),
            b"*0\r\n".to_vec(),
            cmd(&[b"CONFIG", b"GET", b"x"]),
            cmd(&[b"AUTHX"]),
            cmd(&[b"RESET"]),
            cmd(&[b"GET", b"after"]),
        ]
        .concat();
        let want_up = [
            cmd(&[b"SET", b"k", b"v"]),
            cmd(&[b"AUTH", b"app", b"s3cret"]),
            cmd(&[b"GET", b"k"]),
            cmd(&[b"Hello", b"3", b"AUTH", b"app", b"s3cret"]),
            cmd(&[b"PING"]),
            b"*0\r\n".to_vec(),
            cmd(&[b"CONFIG", b"GET", b"x"]),
            cmd(&[b"AUTHX"]),
        ]
        .concat();
        for step in 1..=stream.len() {
            let mut g = guard();
            g.resume(ClientPosition::default());
            let (up, local, go_on) = walk(&mut g, &stream, step);
            assert!(!go_on, "step {step}");
            assert_eq!(
                String::from_utf8_lossy(&up),
                String::from_utf8_lossy(&want_up),
                "step {step}"
            );
            let text = String::from_utf8_lossy(&local);
            assert!(text.starts_with("-ERR warden: RESET") && text.contains("\"r\""));
            assert!(!text.contains("s3cret") && !text.contains("client-pw"));
            assert_eq!(g.refused(), 1);
        }
    }

    /// Resumed inside a command (the kernel handed over at a bulk string
    /// past its window): the rest of it passes, then commands are walked.
    #[test]
    fn a_walk_resumed_inside_a_command_finishes_it_first() {
        let stream = [
            b"$1\r\nk\r\n$5\r\nvalue\r\n".to_vec(),
            cmd(&[b"AUTH", b"x"]),
        ]
        .concat();
        for step in 1..=stream.len() {
            let mut g = guard();
            g.resume(ClientPosition {
                continues: false,
                args: 2,
            });
            let (up, local, go_on) = walk(&mut g, &stream, step);
            assert!(go_on && local.is_empty(), "step {step}");
            let want = [
                b"$1\r\nk\r\n$5\r\nvalue\r\n".to_vec(),
                cmd(&[b"AUTH", b"app", b"s3cret"]),
            ]
            .concat();
            assert_eq!(up, want, "step {step}");
        }
    }

    #[test]
    fn malformed_resp_ends_the_session_with_a_protocol_error() {
        for bad in [
            &b"*1\r\n$-1\r\n"[..],
            b"*01\r\n$4\r\nPING\r\n",
            b"*1\r\n+PING\r\n",
            b"*x\r\n",
            b"*2\r\n$4\r\nAUTH\r\n+oops\r\n",
            b"*2\r\n$3\r\nGETxx$1\r\nk\r\n",
            b"*2\r\n$6\r\nCONFIG\r\n$1\r\nkXX",
        ] {
            let stream = bad.to_vec();
            let mut g = guard();
            g.resume(ClientPosition::default());
            let (up, local, go_on) = walk(&mut g, &stream, stream.len());
            assert!(!go_on, "{}", String::from_utf8_lossy(bad));
            assert!(
                !up.windows(2).any(|w| w == b"XX"),
                "nothing after the bad CRLF"
            );
            assert!(local.starts_with(b"-ERR Protocol error"));
        }
        // A header line that never ends.
        let mut g = guard();
        let (_, local, go_on) = walk(&mut g, &[b'*'; 100], 7);
        assert!(!go_on && local.starts_with(b"-ERR Protocol error"));
    }
}
