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
    if cred.dynamic.is_some() {
        c.error(
            format!("{k}.credential.dynamic"),
            "dynamic credentials (a MySQL user per lease) are not built yet for mysql routes",
            "remove dynamic and store the password of a fixed user: credential = { user = \"app\", secret = \"orders-db/app\" }",
        );
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
        only_error(
            &mysql_cfg("").replace(
                "secret = \"orders-db/app\" }",
                "secret = \"orders-db/app\", dynamic = { ttl = \"1h\" } }",
            ),
            "route[0].credential.dynamic",
        );
        only_error(
            &mysql_cfg("deny_commands = [\"X\"]"),
            "route[0].deny_commands",
        );
        // A pool is fine; only PostgreSQL's "auto" reset is not.
        ok(&mysql_cfg("pool = { max_idle = 4 }"));
        only_error(
            &mysql_cfg("pool = { reset = \"auto\" }"),
            "route[0].pool.reset",
        );
        ok(&mysql_cfg("pool = { reset = \"always\" }"));
        only_error(&mysql_cfg("kernel_relay = true"), "route[0].kernel_relay");
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
