//! Keys of `kind = "mysql"` routes (MySQL and MariaDB): the credential's
//! user, and the keys other kinds use that a mysql route refuses.

use super::{Route, RouteKind};
use crate::config::check::Checker;

/// Longest user name MariaDB accepts (MySQL: 32).
const MAX_USER_LEN: usize = 80;

/// Rules for a mysql route's keys.
pub(super) fn check_mysql_keys(c: &mut Checker<'_>, k: &str, r: &Route) {
    if r.kind != RouteKind::Mysql {
        return;
    }
    if !r.databases.is_empty() {
        c.error(
            format!("{k}.databases"),
            "databases is only used by kind = \"postgres\" routes: a MySQL client can switch databases at any time (USE, COM_INIT_DB), so a list checked at login would not hold",
            "remove databases and restrict the login user's grants on the server instead (GRANT ... ON orders.* TO 'app'@'%')",
        );
    }
    let Some(cred) = &r.credential else { return };
    if let Some(d) = &cred.dynamic {
        check_mysql_dynamic(c, &format!("{k}.credential.dynamic"), d);
    }
    if cred.user.len() > MAX_USER_LEN || cred.user.chars().any(|ch| ch.is_control()) {
        c.error(
            format!("{k}.credential.user"),
            format!(
                "credential.user {:?} is not a MySQL user name (at most {MAX_USER_LEN} bytes, no control characters)",
                cred.user
            ),
            "set user to the account warden logs in as, e.g. user = \"app\"",
        );
    }
}

/// Longest lease user name: MySQL's limit (MariaDB's is 80).
pub const MAX_LEASE_USER_LEN: usize = 32;

/// Rules for a mysql route's `credential.dynamic` (on top of every kind's).
fn check_mysql_dynamic(c: &mut Checker<'_>, k: &str, d: &crate::config::Dynamic) {
    for (key, set) in [
        ("grant_mode", d.grant_mode != Default::default()),
        ("scram_iterations", d.scram_iterations.is_some()),
        ("database", d.database.is_some()),
        ("reassign_owned_to", d.reassign_owned_to.is_some()),
    ] {
        if set {
            c.error(
                format!("{k}.{key}"),
                format!("{key} is only used by kind = \"postgres\" dynamic routes"),
                format!("remove {key}: a mysql lease user gets its privileges from role = \"...\" or grants"),
            );
        }
    }
    if let Some(role) = &d.role {
        let bad = role.is_empty()
            || role.len() > 80
            || role
                .chars()
                .any(|ch| ch.is_control() || matches!(ch, '`' | '\'' | '"' | '\\'));
        if bad {
            c.error(
                format!("{k}.role"),
                format!("role {role:?} is not a MariaDB role name warden accepts (1 to 80 bytes, no quotes, backslash or control characters)"),
                "set role to a role that exists on the server, e.g. role = \"orders_reader\" (CREATE ROLE orders_reader; GRANT SELECT ON orders.* TO orders_reader)",
            );
        }
    } else if d.grants.is_empty() {
        c.warn(
            k.to_string(),
            "neither role nor grants is set: lease users can log in but have no privileges",
            "add role = \"orders_reader\" (a MariaDB role) or grants = [\"GRANT SELECT ON orders.* TO {role}\"]",
        );
    }
    let prefix = d.role_prefix();
    if prefix.len() + 1 + 8 >= MAX_LEASE_USER_LEN {
        c.error(
            format!("{k}.role_prefix"),
            format!("role_prefix \"{prefix}\" leaves no room for the workload in a {MAX_LEASE_USER_LEN}-byte MySQL user name"),
            "use a prefix of at most 20 characters, e.g. role_prefix = \"w_\"",
        );
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use crate::config::test_util::{ok, only_error};

    fn mysql_cfg(extra: &str) -> String {
        format!(
            r#"
trust_domain = "example.org"

[[workload]]
name = "web"
spiffe_id = "spiffe://example.org/web"
selectors = {{ uid = 1000 }}

[[route]]
name = "orders"
kind = "mysql"
listen = "127.0.0.1:13306"
upstream = "127.0.0.1:3306"
upstream_tls = {{ mode = "disable" }}
credential = {{ user = "app", secret = "orders-db/app" }}
allow = ["web"]
{extra}
"#
        )
    }

    #[test]
    fn a_mysql_route_needs_a_credential_with_a_user() {
        ok(&mysql_cfg(""));
        ok(&mysql_cfg("client_tls = true"));
        ok(&mysql_cfg("client_tls = \"require\""));
        ok(&mysql_cfg("").replace("upstream_tls = { mode = \"disable\" }\n", ""));
        only_error(
            &mysql_cfg("").replace(
                "credential = { user = \"app\", secret = \"orders-db/app\" }\n",
                "",
            ),
            "route[0].credential",
        );
        let i = only_error(
            &mysql_cfg("").replace("user = \"app\", ", ""),
            "route[0].credential.user",
        );
        assert!(i.problem.contains("missing"), "{i:?}");
        only_error(
            &mysql_cfg("").replace("user = \"app\"", "user = \"a\\nb\""),
            "route[0].credential.user",
        );
    }

    #[test]
    fn rotate_method_mysql_names_a_mysql_route_using_the_secret() {
        let with = |secret: &str| {
            mysql_cfg("").replace(
                "[[route]]",
                &format!("[[secret]]\nname = \"orders-db/app\"\nrotation_period = \"24h\"\nrotate = {secret}\n\n[[route]]"),
            )
        };
        ok(&with("{ method = \"mysql\", route = \"orders\" }"));
        let i = only_error(&with("{ method = \"mysql\" }"), "secret[0].rotate.route");
        assert!(i.fix.contains("mysql [[route]]"), "{i:?}");
        only_error(
            &with("{ method = \"mysql\", route = \"nope\" }"),
            "secret[0].rotate.route",
        );
        // A mysql route is not a postgres route.
        only_error(
            &with("{ method = \"postgres\", route = \"orders\" }"),
            "secret[0].rotate.route",
        );
    }

    #[test]
    fn keys_of_other_kinds_are_refused_with_key_and_fix() {
        let i = only_error(&mysql_cfg("databases = [\"orders\"]"), "route[0].databases");
        assert!(i.fix.contains("GRANT"), "{i:?}");
        let dynamic = |d: &str| {
            mysql_cfg("").replace(
                "secret = \"orders-db/app\" }",
                &format!("secret = \"orders-db/app\", dynamic = {d} }}"),
            )
        };
        ok(&dynamic("{ ttl = \"1h\", role = \"orders_reader\" }"));
        ok(&dynamic(
            "{ grants = [\"GRANT SELECT ON orders.* TO {role}\"], role_prefix = \"w_\" }",
        ));
        only_error(
            &dynamic("{ role = \"r\", grant_mode = \"per_lease\" }"),
            "route[0].credential.dynamic.grant_mode",
        );
        only_error(
            &dynamic("{ role = \"r\", scram_iterations = 16 }"),
            "route[0].credential.dynamic.scram_iterations",
        );
        only_error(
            &dynamic("{ role = \"a`b\" }"),
            "route[0].credential.dynamic.role",
        );
        only_error(
            &dynamic("{ role = \"r\", grants = [\"GRANT SELECT ON x.* TO app\"] }"),
            "route[0].credential.dynamic.grants[0]",
        );
        only_error(
            &mysql_cfg("deny_commands = [\"X\"]"),
            "route[0].deny_commands",
        );
        // A pool, with either reset mode.
        ok(&mysql_cfg("pool = { max_idle = 4 }"));
        ok(&mysql_cfg("pool = { reset = \"auto\" }"));
        ok(&mysql_cfg("pool = { reset = \"always\" }"));
        // kernel_relay: on unless turned off (the kernel program hands a
        // spliced session's COM_CHANGE_USER to warden).
        assert_eq!(ok(&mysql_cfg("")).routes[0].kernel_relay, None);
        assert!(ok(&mysql_cfg("")).routes[0].kernel_relay_on());
        for v in ["true", "false"] {
            let cfg = ok(&mysql_cfg(&format!("kernel_relay = {v}")));
            assert_eq!(cfg.routes[0].kernel_relay_on(), v == "true");
        }
        only_error(
            &mysql_cfg("").replace("upstream = \"127.0.0.1:3306\"", "upstream = \"db\""),
            "route[0].upstream",
        );
        let w = crate::config::test_util::ok(
            &mysql_cfg("").replace("127.0.0.1:3306", "db.internal:3306"),
        );
        assert!(
            w.warnings
                .iter()
                .any(|w| w.key == "route[0].upstream_tls.mode"),
            "{:?}",
            w.warnings
        );
    }
}
