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
    if r.credential.as_ref().is_some_and(|cr| cr.dynamic.is_some()) {
        c.error(
            format!("{k}.credential.dynamic"),
            "dynamic credentials (a Redis ACL user per lease) are not built yet for redis routes",
            "remove dynamic and store the password of a fixed ACL user: credential = { user = \"app\", secret = \"cache/app\" }",
        );
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
    if rotated && setuser_allowed {
        c.warn(
            format!("{k}.deny_commands"),
            "this route's secret is rotated with method \"redis\", so its ACL user may run ACL SETUSER, and so may the route's clients: they could change its password or permissions",
            "add \"ACL\" (or \"ACL|SETUSER\" and \"ACL|SAVE\") to deny_commands",
        );
    }
    if !refused("CONFIG") {
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
        // client_tls and pool apply to redis routes; pool.reset does not.
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
        let i = only_error(
            &redis_cfg("deny_commands = [\"CONFIG\"]\npool = { reset = \"auto\" }"),
            "route[0].pool.reset",
        );
        assert!(i.problem.contains("RESET"), "{i:?}");
        only_error(
            &redis_cfg("deny_commands = [\"CONFIG\"]\npool = { idle_timeout = \"0s\" }"),
            "route[0].pool.idle_timeout",
        );
        only_error(
            &redis_cfg("deny_commands = [\"CONFIG\"]").replace(
                "secret = \"cache/default\" }",
                "secret = \"cache/default\", dynamic = { ttl = \"1h\" } }",
            ),
            "route[0].credential.dynamic",
        );
        // A remote upstream without TLS is warned about, as for postgres.
        let w = warnings(
            &redis_cfg("deny_commands = [\"CONFIG\"]")
                .replace("127.0.0.1:6379", "cache.internal:6379"),
        );
        assert!(w.contains("route[0].upstream_tls.mode"), "{w}");
    }
}
