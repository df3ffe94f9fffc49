//! Keys of `kind = "redis"` routes: `deny_commands` / `allow_commands`, and
//! the keys other kinds use that a redis route refuses.

use super::{Route, RouteKind};
use crate::config::check::Checker;
use crate::config::RotateMethod;

/// Commands warden answers itself on a redis route: listing them changes
/// nothing.
const ANSWERED_BY_WARDEN: &[&str] = &["AUTH", "HELLO"];

/// Rules for a redis route's own keys, and the keys only redis routes use.
pub(super) fn check_redis_keys(c: &mut Checker<'_>, k: &str, r: &Route) {
    if r.kind != RouteKind::Redis {
        for (key, set) in [
            ("deny_commands", r.deny_commands.is_some()),
            ("allow_commands", r.allow_commands.is_some()),
        ] {
            if set {
                c.error(
                    format!("{k}.{key}"),
                    format!("{key} is only used by kind = \"redis\" routes; this route is kind = \"{}\"", r.kind),
                    format!("remove {key} from this route"),
                );
            }
        }
        return;
    }
    if !r.databases.is_empty() {
        c.error(
            format!("{k}.databases"),
            "databases is only used by kind = \"postgres\" routes",
            "remove databases from this route (restrict commands with deny_commands, e.g. deny_commands = [\"SELECT\"])",
        );
    }
    if let Some((cred, d)) = r
        .credential
        .as_ref()
        .and_then(|cr| cr.dynamic.as_ref().map(|d| (cr, d)))
    {
        check_redis_dynamic(c, &format!("{k}.credential"), &cred.user, d);
    }
    if r.deny_commands.is_some() && r.allow_commands.is_some() {
        c.error(
            format!("{k}.allow_commands"),
            "deny_commands and allow_commands are both set; a route uses one or the other",
            "keep allow_commands (only the listed commands pass) or deny_commands (all but the listed pass), not both",
        );
    }
    for (key, list) in [
        ("deny_commands", &r.deny_commands),
        ("allow_commands", &r.allow_commands),
    ] {
        let Some(list) = list else { continue };
        if list.is_empty() && key == "allow_commands" {
            c.error(
                format!("{k}.{key}"),
                "allow_commands is empty, so every command would be refused",
                "list the commands clients may send, e.g. allow_commands = [\"GET\", \"SET\", \"DEL\"], or remove the key",
            );
        }
        for (j, name) in list.iter().enumerate() {
            let key_j = format!("{k}.{key}[{j}]");
            if let Err(problem) = check_command_name(name) {
                c.error(
                    key_j,
                    problem,
                    "write a Redis command name, or command|subcommand, e.g. \"CONFIG\" or \"CLIENT|KILL\"",
                );
                continue;
            }
            let upper = name.to_ascii_uppercase();
            if list[..j].iter().any(|o| o.eq_ignore_ascii_case(name)) {
                c.warn(
                    key_j,
                    format!("command \"{name}\" is listed twice"),
                    "remove the duplicate",
                );
            } else if ANSWERED_BY_WARDEN.contains(&upper.as_str()) {
                c.warn(
                    key_j,
                    format!("{upper} is answered by warden itself (the client's password is never checked or forwarded), so listing it changes nothing"),
                    format!("remove \"{name}\""),
                );
            }
        }
    }
    let refused = |cmd: &str| match (&r.allow_commands, &r.deny_commands) {
        (Some(allow), _) => !allow.iter().any(|a| a.eq_ignore_ascii_case(cmd)),
        (None, Some(deny)) => deny.iter().any(|d| d.eq_ignore_ascii_case(cmd)),
        (None, None) => false,
    };
    // warden's rotation needs ACL SETUSER for the route's user; its
    // clients should not have it.
    let rotated = c.config.secrets.iter().any(|s| {
        s.rotate.as_ref().is_some_and(|rot| {
            rot.method == RotateMethod::Redis && rot.route.as_deref() == Some(r.name.as_str())
        })
    });
    let listed = |list: &[String]| {
        list.iter()
            .any(|e| e.eq_ignore_ascii_case("ACL") || e.eq_ignore_ascii_case("ACL|SETUSER"))
    };
    let setuser_allowed = match (&r.allow_commands, &r.deny_commands) {
        (Some(allow), _) => listed(allow),
        (None, Some(deny)) => !listed(deny),
        (None, None) => true,
    };
    // On a dynamic route clients run as lease users with `acl`'s rules,
    // never as the route's user: the two warnings below do not apply.
    let dynamic = r.credential.as_ref().is_some_and(|cr| cr.dynamic.is_some());
    if rotated && setuser_allowed && !dynamic {
        c.warn(
            format!("{k}.deny_commands"),
            "this route's secret is rotated with method \"redis\", so its ACL user may run ACL SETUSER, and so may the route's clients: they could change its password or permissions",
            "add \"ACL\" (or \"ACL|SETUSER\" and \"ACL|SAVE\") to deny_commands",
        );
    }
    if !refused("CONFIG") && !dynamic {
        c.warn(
            format!("{k}.deny_commands"),
            "clients of this route may send CONFIG: with requirepass, CONFIG GET requirepass returns the very password warden keeps from them",
            "add deny_commands = [\"CONFIG\", \"ACL\", \"DEBUG\"] (or log in as an ACL user without the @admin category)",
        );
    }
}

/// A command name: letters, digits, `-`, `_`, `.`, with at most one `|`
/// separating a subcommand (Redis' ACL spelling, e.g. `CLIENT|KILL`).
fn check_command_name(name: &str) -> Result<(), String> {
    let ok_part = |p: &str| {
        !p.is_empty()
            && p.len() <= 64
            && p.bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
    };
    let good = match name.split_once('|') {
        Some((cmd, sub)) => ok_part(cmd) && ok_part(sub),
        None => ok_part(name),
    };
    if good {
        Ok(())
    } else {
        Err(format!(
            "\"{name}\" is not a Redis command name (letters, digits, - _ . and one optional |subcommand)"
        ))
    }
}

/// Rules for a redis route's `credential.dynamic` (on top of every kind's).
fn check_redis_dynamic(c: &mut Checker<'_>, k: &str, user: &str, d: &crate::config::Dynamic) {
    if user.is_empty() {
        c.error(
            format!("{k}.user"),
            "a dynamic redis route needs credential.user: the ACL user warden creates and deletes lease users as (it needs +acl and +client|kill)",
            "set user to an administrative ACL user, e.g. user = \"warden-admin\" (ACL SETUSER warden-admin on >… +acl +client|kill)",
        );
    }
    let k = format!("{k}.dynamic");
    for (key, set) in [
        ("grants", !d.grants.is_empty()),
        ("grant_mode", d.grant_mode != Default::default()),
        ("scram_iterations", d.scram_iterations.is_some()),
        ("database", d.database.is_some()),
        ("reassign_owned_to", d.reassign_owned_to.is_some()),
    ] {
        if set {
            c.error(
                format!("{k}.{key}"),
                format!("{key} is only used by kind = \"postgres\" or \"mysql\" dynamic routes"),
                format!("remove {key}: a redis lease user gets its permissions from acl = \"...\" (ACL rules, e.g. acl = \"~app:* +@read +@write -@dangerous\")"),
            );
        }
    }
    match &d.acl {
        None => c.error(
            format!("{k}.acl"),
            "a dynamic redis route needs acl: the ACL rules each lease user gets",
            "set e.g. acl = \"~app:* +@read +@write -@dangerous\" (keys app:*, read and write commands, nothing dangerous)",
        ),
        Some(text) => {
            if let Err(problem) = acl_rules(text) {
                c.error(
                    format!("{k}.acl"),
                    problem,
                    "write ACL rules for keys, channels and commands only, e.g. acl = \"~app:* +@read +@write -@dangerous\"; warden sets the user's password and turns it on",
                );
            }
        }
    }
}

/// Rule words warden sets itself on a lease user, or that would change its
/// password or state.
const OWNED_BY_WARDEN: &[&str] = &["on", "off", "nopass", "resetpass", "reset"];

/// The words of a lease user's `acl` (one `ACL SETUSER` argument each; a
/// selector `(…)` is one word with its spaces), or why they cannot be used:
/// empty, unbalanced parentheses, a control character, or a rule about the
/// password or the user's state (`>`, `<`, `#`, `!`, `nopass`, `resetpass`,
/// `on`, `off`, `reset`), which warden owns.
pub fn acl_rules(text: &str) -> std::result::Result<Vec<String>, String> {
    if text.chars().any(|ch| ch.is_control()) {
        return Err("acl contains a control character".into());
    }
    let mut words = Vec::new();
    let mut word = String::new();
    let mut depth = 0usize;
    for ch in text.chars() {
        match ch {
            '(' => depth += 1,
            ')' => {
                depth = depth
                    .checked_sub(1)
                    .ok_or("acl has a ')' without its '('")?;
            }
            _ => {}
        }
        if ch.is_whitespace() && depth == 0 {
            if !word.is_empty() {
                words.push(std::mem::take(&mut word));
            }
        } else {
            word.push(ch);
        }
    }
    if depth != 0 {
        return Err("acl has a '(' without its ')'".into());
    }
    if !word.is_empty() {
        words.push(word);
    }
    if words.is_empty() {
        return Err("acl is empty, so lease users could run no command".into());
    }
    for w in &words {
        for rule in w
            .trim_matches(|ch| ch == '(' || ch == ')')
            .split_whitespace()
        {
            if rule.starts_with(['>', '<', '#', '!'])
                || OWNED_BY_WARDEN.iter().any(|o| rule.eq_ignore_ascii_case(o))
            {
                return Err(format!(
                    "acl rule {rule:?} sets the password or the state of the user; warden sets them on every lease user (on, with a generated password)"
                ));
            }
        }
    }
    Ok(words)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use crate::config::test_util::{ok, only_error};

    fn warnings(text: &str) -> String {
        ok(text)
            .warnings
            .iter()
            .map(|w| format!("{}: {} ({})\n", w.key, w.problem, w.fix))
            .collect()
    }

    fn redis_cfg(extra: &str) -> String {
        format!(
            r#"
trust_domain = "example.org"

[[workload]]
name = "web"
spiffe_id = "spiffe://example.org/web"
selectors = {{ uid = 1000 }}

[[route]]
name = "cache"
kind = "redis"
listen = "127.0.0.1:16379"
upstream = "127.0.0.1:6379"
upstream_tls = {{ mode = "disable" }}
credential = {{ secret = "cache/default" }}
allow = ["web"]
{extra}
"#
        )
    }

    #[test]
    fn a_redis_route_needs_a_credential_and_takes_an_optional_user() {
        ok(&redis_cfg(
            "deny_commands = [\"CONFIG\", \"FLUSHALL\", \"client|kill\"]",
        ));
        ok(&redis_cfg("deny_commands = [\"CONFIG\"]").replace(
            "credential = { secret",
            "credential = { user = \"app\", cache_ttl = \"1m\", secret",
        ));
        only_error(
            &redis_cfg("deny_commands = [\"CONFIG\"]")
                .replace("credential = { secret = \"cache/default\" }\n", ""),
            "route[0].credential",
        );
        only_error(
            &redis_cfg("deny_commands = [\"CONFIG\"]").replace(
                "credential = { secret",
                "credential = { user = \"a b\", secret",
            ),
            "route[0].credential.user",
        );
    }

    #[test]
    fn kernel_relay_is_a_redis_route_bool() {
        assert_eq!(ok(&redis_cfg("")).routes[0].kernel_relay, None);
        // On unless turned off (the kernel program hands a spliced
        // session's AUTH, HELLO and RESET to warden).
        assert!(ok(&redis_cfg("")).routes[0].kernel_relay_on());
        for v in ["true", "false"] {
            let cfg = ok(&redis_cfg(&format!("kernel_relay = {v}")));
            assert_eq!(cfg.routes[0].kernel_relay, Some(v == "true"));
            assert_eq!(cfg.routes[0].kernel_relay_on(), v == "true");
        }
    }

    #[test]
    fn rotate_method_redis_names_a_redis_route_using_the_secret() {
        let with = |rotate: &str| {
            redis_cfg("deny_commands = [\"CONFIG\", \"ACL\"]").replace(
                "[[route]]",
                &format!("[[secret]]\nname = \"cache/default\"\nrotation_period = \"24h\"\nrotate = {rotate}\n\n[[route]]"),
            )
        };
        ok(&with("{ method = \"redis\", route = \"cache\" }"));
        // Clients that may send ACL SETUSER are warned about.
        let w = warnings(
            &with("{ method = \"redis\", route = \"cache\" }")
                .replace("\"CONFIG\", \"ACL\"", "\"CONFIG\""),
        );
        assert!(
            w.contains("route[0].deny_commands: this route's secret is rotated"),
            "{w}"
        );
        assert!(warnings(&with("{ method = \"redis\", route = \"cache\" }")).is_empty());
        let i = only_error(&with("{ method = \"redis\" }"), "secret[0].rotate.route");
        assert!(i.fix.contains("redis [[route]]"), "{i:?}");
        assert!(i.problem.contains("ACL user"), "{i:?}");
        only_error(
            &with("{ method = \"redis\", route = \"nope\" }"),
            "secret[0].rotate.route",
        );
        // A redis route is not a mysql route.
        only_error(
            &with("{ method = \"mysql\", route = \"cache\" }"),
            "secret[0].rotate.route",
        );
    }

    #[test]
    fn command_lists_are_checked_with_key_and_fix() {
        let i = only_error(
            &redis_cfg("deny_commands = [\"CONFIG\", \"FLUSH ALL\"]"),
            "route[0].deny_commands[1]",
        );
        assert!(i.fix.contains("CLIENT|KILL"), "{i:?}");
        only_error(&redis_cfg("allow_commands = []"), "route[0].allow_commands");
        only_error(
            &redis_cfg("allow_commands = [\"GET\"]\ndeny_commands = [\"CONFIG\"]"),
            "route[0].allow_commands",
        );
        // Without a list that refuses CONFIG, a warning says why.
        let w = warnings(&redis_cfg(""));
        assert!(
            w.contains("route[0].deny_commands: clients of this route may send CONFIG"),
            "{w}"
        );
        assert!(warnings(&redis_cfg("deny_commands = [\"CONFIG\"]")).is_empty());
        assert!(warnings(&redis_cfg("allow_commands = [\"GET\"]")).is_empty());
        let w = warnings(&redis_cfg("deny_commands = [\"CONFIG\", \"AUTH\"]"));
        assert!(
            w.contains("route[0].deny_commands[1]: AUTH is answered by warden itself"),
            "{w}"
        );
        // Keys of other kinds are refused on a redis route, and vice versa.
        only_error(
            &redis_cfg("deny_commands = [\"CONFIG\"]\ndatabases = [\"x\"]"),
            "route[0].databases",
        );
        // client_tls and pool (with reset) apply to redis routes.
        ok(&redis_cfg(
            "deny_commands = [\"CONFIG\"]\nclient_tls = true",
        ));
        ok(&redis_cfg(
            "deny_commands = [\"CONFIG\"]\nclient_tls = \"require\"",
        ));
        ok(&redis_cfg("deny_commands = [\"CONFIG\"]\npool = false"));
        ok(&redis_cfg(
            "deny_commands = [\"CONFIG\"]\npool = { max_idle = 4, idle_timeout = \"30s\" }",
        ));
        ok(&redis_cfg(
            "deny_commands = [\"CONFIG\"]\npool = { reset = \"auto\" }",
        ));
        ok(&redis_cfg(
            "deny_commands = [\"CONFIG\"]\npool = { reset = \"always\" }",
        ));
        only_error(
            &redis_cfg("deny_commands = [\"CONFIG\"]\npool = { reset = \"never\" }"),
            "route[0].pool.reset",
        );
        only_error(
            &redis_cfg("deny_commands = [\"CONFIG\"]\npool = { idle_timeout = \"0s\" }"),
            "route[0].pool.idle_timeout",
        );
        let dynamic = |d: &str| {
            redis_cfg("deny_commands = [\"CONFIG\"]").replace(
                "secret = \"cache/default\" }",
                &format!("user = \"admin\", secret = \"cache/default\", dynamic = {d} }}"),
            )
        };
        ok(&dynamic(
            "{ ttl = \"1h\", acl = \"~app:* +@read (~x:* +get) -@dangerous\" }",
        ));
        // Sessions run as lease users: the route user's CONFIG warning is moot.
        let w =
            warnings(&dynamic("{ acl = \"+get\" }").replace("deny_commands = [\"CONFIG\"]", ""));
        assert!(!w.contains("deny_commands"), "{w}");
        let i = only_error(
            &dynamic("{ ttl = \"1h\" }"),
            "route[0].credential.dynamic.acl",
        );
        assert!(i.fix.contains("acl = "), "{i:?}");
        for bad in [
            ">pw",
            "<pw",
            "nopass",
            "#abc",
            "!abc",
            "RESETPASS",
            "on",
            "reset",
            "(~a +get",
            "~a)",
            "(~a >x)",
        ] {
            only_error(
                &dynamic(&format!("{{ acl = \"+get {bad}\" }}")),
                "route[0].credential.dynamic.acl",
            );
        }
        only_error(
            &dynamic("{ acl = \" \" }"),
            "route[0].credential.dynamic.acl",
        );
        let i = only_error(
            &dynamic("{ acl = \"+get\", grants = [\"GRANT x TO {role}\"] }"),
            "route[0].credential.dynamic.grants",
        );
        assert!(i.fix.contains("acl = "), "{i:?}");
        only_error(
            &dynamic("{ acl = \"+get\", database = \"x\" }"),
            "route[0].credential.dynamic.database",
        );
        only_error(
            &dynamic("{ acl = \"+get\" }").replace("user = \"admin\", ", ""),
            "route[0].credential.user",
        );
        assert_eq!(
            super::acl_rules(" ~app:*  (~x:* +get) +@read ").unwrap(),
            vec!["~app:*", "(~x:* +get)", "+@read"]
        );
        // A remote upstream without TLS is warned about, as for postgres.
        let w = warnings(
            &redis_cfg("deny_commands = [\"CONFIG\"]")
                .replace("127.0.0.1:6379", "cache.internal:6379"),
        );
        assert!(w.contains("route[0].upstream_tls.mode"), "{w}");
    }
}
