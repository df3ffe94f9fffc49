//! `KILL` by connection id on pooled routes. A pooled route's client does
//! not know at its greeting which server connection it will get (and that
//! connection serves other clients later), so warden greets it with an id
//! of its own, at or above 2³¹ (server thread ids stay far below), and
//! remembers which server connection the session got. A `KILL [QUERY |
//! CONNECTION] <id>` statement (the `mariadb` CLI's Ctrl-C, Connector/J's
//! `Statement.cancel`) or `COM_PROCESS_KILL` (PyMySQL's `kill`) naming a
//! warden id is rewritten to the server connection's id — only for a
//! session of the same route and workload; any other warden id is answered
//! with ERR 1094 (HY000) "Unknown thread id", as the server answers, and
//! not forwarded. Ids below 2³¹ (from `SELECT CONNECTION_ID()`) pass
//! unchanged: the server checks them against the login's user.

use crate::packet::ErrPacket;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Mutex;

/// The first id warden hands out.
const FIRST: u32 = 1 << 31;
/// A `KILL` statement longer than this is not inspected (forwarded as is).
pub const MAX_KILL_LEN: usize = 64;
const COM_QUERY: u8 = 0x03;
pub const COM_PROCESS_KILL: u8 = 0x0c;

struct Entry {
    route: String,
    workload: String,
    /// The server connection the session uses (None until it has one).
    server: Option<u32>,
}

/// Every pooled session's warden id.
pub struct Registry {
    next: AtomicU32,
    ids: Mutex<HashMap<u32, Entry>>,
}

impl Default for Registry {
    fn default() -> Self {
        Registry {
            next: AtomicU32::new(0),
            ids: Mutex::new(HashMap::new()),
        }
    }
}

/// A session's warden id; forgotten when dropped.
pub struct Registered<'a> {
    id: u32,
    registry: &'a Registry,
}

impl Registered<'_> {
    pub fn id(&self) -> u32 {
        self.id
    }

    /// The session now uses server connection `server`.
    pub fn set_server(&self, server: u32) {
        if let Ok(mut ids) = self.registry.ids.lock() {
            if let Some(e) = ids.get_mut(&self.id) {
                e.server = Some(server);
            }
        }
    }
}

impl Drop for Registered<'_> {
    fn drop(&mut self) {
        if let Ok(mut ids) = self.registry.ids.lock() {
            ids.remove(&self.id);
        }
    }
}

/// Who asks to kill (the session whose relay read the statement).
pub struct Scope<'a> {
    pub registry: &'a Registry,
    pub route: &'a str,
    pub workload: &'a str,
}

/// What the relay does with a command.
#[derive(Debug, PartialEq, Eq)]
pub enum Action {
    /// Not a KILL of a warden id: forward unchanged.
    Pass,
    /// Forward this payload instead.
    Rewrite(Vec<u8>),
    /// Answer the client with this error; forward nothing.
    Refuse(ErrPacket),
}

impl Registry {
    /// A new id for a session of `workload` on `route`.
    pub fn register(&self, route: &str, workload: &str) -> Registered<'_> {
        let mut ids = match self.ids.lock() {
            Ok(ids) => ids,
            Err(p) => p.into_inner(),
        };
        let id = loop {
            let id = FIRST | (self.next.fetch_add(1, Ordering::Relaxed) & !FIRST);
            if !ids.contains_key(&id) {
                break id;
            }
        };
        ids.insert(
            id,
            Entry {
                route: route.to_string(),
                workload: workload.to_string(),
                server: None,
            },
        );
        Registered { id, registry: self }
    }

    /// The server connection behind warden id `id`, if `route`/`workload`
    /// may kill it.
    fn server_of(&self, id: u32, route: &str, workload: &str) -> Option<u32> {
        let ids = self.ids.lock().ok()?;
        let e = ids.get(&id)?;
        (e.route == route && e.workload == workload)
            .then_some(e.server)
            .flatten()
    }
}

/// `KILL [QUERY | CONNECTION] <n>` (any case, optional `;`): whether only
/// the query, and `n`.
fn parse_kill(sql: &[u8]) -> Option<(bool, u64)> {
    let text = std::str::from_utf8(sql).ok()?;
    let text = text.trim().trim_end_matches(';').trim_end();
    let mut words = text.split_ascii_whitespace();
    if !words.next()?.eq_ignore_ascii_case("KILL") {
        return None;
    }
    let mut w = words.next()?;
    let mut query = false;
    if w.eq_ignore_ascii_case("QUERY") {
        query = true;
        w = words.next()?;
    } else if w.eq_ignore_ascii_case("CONNECTION") {
        w = words.next()?;
    }
    if words.next().is_some() || w.is_empty() || !w.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some((query, w.parse().ok()?))
}

fn unknown(id: u64) -> Action {
    Action::Refuse(ErrPacket::new(
        1094,
        "HY000",
        format!("Unknown thread id: {id}"),
    ))
}

/// What to do with command `payload` (command byte first) on a pooled
/// route's session in `scope`.
pub fn inspect(payload: &[u8], scope: &Scope<'_>) -> Action {
    let (query, id) = match payload.split_first() {
        Some((&COM_QUERY, sql)) if sql.len() <= MAX_KILL_LEN => match parse_kill(sql) {
            Some(k) => k,
            None => return Action::Pass,
        },
        Some((&COM_PROCESS_KILL, id)) if id.len() == 4 => (
            false,
            u64::from(u32::from_le_bytes([id[0], id[1], id[2], id[3]])),
        ),
        _ => return Action::Pass,
    };
    let Ok(id32) = u32::try_from(id) else {
        return unknown(id);
    };
    if id32 < FIRST {
        return Action::Pass;
    }
    let Some(server) = scope.registry.server_of(id32, scope.route, scope.workload) else {
        return unknown(id);
    };
    Action::Rewrite(match payload[0] {
        COM_PROCESS_KILL => {
            let mut p = vec![COM_PROCESS_KILL];
            p.extend_from_slice(&server.to_le_bytes());
            p
        }
        _ => {
            let what = if query { "QUERY" } else { "CONNECTION" };
            let mut p = vec![COM_QUERY];
            p.extend_from_slice(format!("KILL {what} {server}").as_bytes());
            p
        }
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn kill_statements_are_recognised() {
        assert_eq!(parse_kill(b"KILL QUERY 12"), Some((true, 12)));
        assert_eq!(parse_kill(b"  kill connection 7 ;"), Some((false, 7)));
        assert_eq!(parse_kill(b"KILL 3"), Some((false, 3)));
        assert_eq!(parse_kill(b"KILL USER 'x'"), None);
        assert_eq!(parse_kill(b"KILL QUERY 1 2"), None);
        assert_eq!(parse_kill(b"SELECT 1"), None);
        assert_eq!(parse_kill(b"KILL QUERY ID 5"), None);
    }

    #[test]
    fn warden_ids_translate_for_their_own_workload_only() {
        let r = Registry::default();
        let a = r.register("orders", "web");
        let b = r.register("orders", "web");
        assert!(a.id() >= FIRST && b.id() >= FIRST && a.id() != b.id());
        let web = Scope {
            registry: &r,
            route: "orders",
            workload: "web",
        };
        let q = |s: &str| {
            let mut p = vec![COM_QUERY];
            p.extend_from_slice(s.as_bytes());
            p
        };
        // No server connection yet: unknown.
        let kill_a = q(&format!("KILL QUERY {}", a.id()));
        assert!(matches!(inspect(&kill_a, &web), Action::Refuse(_)));
        a.set_server(42);
        assert_eq!(inspect(&kill_a, &web), Action::Rewrite(q("KILL QUERY 42")));
        assert_eq!(
            inspect(&q(&format!("kill {};", a.id())), &web),
            Action::Rewrite(q("KILL CONNECTION 42"))
        );
        let mut pk = vec![COM_PROCESS_KILL];
        pk.extend_from_slice(&a.id().to_le_bytes());
        assert_eq!(
            inspect(&pk, &web),
            Action::Rewrite(vec![COM_PROCESS_KILL, 42, 0, 0, 0])
        );
        // Another workload or route: as if the id did not exist.
        for (route, workload) in [("orders", "api"), ("other", "web")] {
            let s = Scope {
                registry: &r,
                route,
                workload,
            };
            match inspect(&kill_a, &s) {
                Action::Refuse(e) => {
                    assert_eq!(e.code, 1094);
                    assert_eq!(e.message, format!("Unknown thread id: {}", a.id()));
                }
                other => panic!("{other:?}"),
            }
        }
        // Server ids and other statements pass.
        assert_eq!(inspect(&q("KILL QUERY 42"), &web), Action::Pass);
        assert_eq!(inspect(&q("SELECT 1"), &web), Action::Pass);
        let id = a.id();
        drop(a);
        assert!(matches!(
            inspect(&q(&format!("KILL {id}")), &web),
            Action::Refuse(_)
        ));
    }
}
