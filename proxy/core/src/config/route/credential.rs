//! `route[].credential`: the login warden performs upstream, and `dynamic`,
//! a role (PostgreSQL) or user (MySQL, Redis) per workload lease; with their
//! checks (those of one kind in its own module).

use std::time::Duration;

use serde::Deserialize;

use super::{check_cache_ttl, Route};
use crate::config::check::Checker;
use crate::config::duration::{de_opt_duration, format_duration};
use crate::config::names::check_secret_name;

config_enum! {
    /// Where a dynamic route's grants go (`route.credential.dynamic.grant_mode`).
    #[derive(Default)]
    GrantMode {
        /// Once, to a NOLOGIN group role per route (named after a hash of
        /// the grants); each lease role is a member (the default).
        #[default]
        Group => "group",
        /// To every lease role in its creation transaction.
        PerLease => "per_lease",
    }
}

/// `route[].credential`: the database login warden performs.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Credential {
    /// Database user (postgres: required; redis: the ACL user, empty for
    /// `AUTH password` alone).
    #[serde(default)]
    pub user: String,
    /// Name of the secret holding the password.
    pub secret: String,
    /// How long a fetched secret may be reused.
    #[serde(default, deserialize_with = "de_opt_duration")]
    pub cache_ttl: Option<Duration>,
    /// Dynamic credentials: `user`/`secret` are then the administrative login
    /// warden uses to create one role per workload lease.
    #[serde(default)]
    pub dynamic: Option<Dynamic>,
}

/// `route[].credential.dynamic` defaults.
pub const DEFAULT_LEASE_TTL: Duration = Duration::from_secs(3600);
pub const DEFAULT_LEASE_MAX_TTL: Duration = Duration::from_secs(86_400);
pub const MIN_LEASE_TTL: Duration = Duration::from_secs(1);
pub const DEFAULT_ROLE_PREFIX: &str = "warden_";
/// Lease passwords are 256 random bits: stretching adds nothing, and
/// PostgreSQL pays one PBKDF2 at this count per CREATE ROLE.
pub const DEFAULT_LEASE_SCRAM_ITERATIONS: u32 = 16;
/// Most iterations `scram_iterations` may ask for (warden's SCRAM client limit).
pub const MAX_LEASE_SCRAM_ITERATIONS: u32 = 1_000_000;

/// `route[].credential.dynamic`: a role per workload lease.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Dynamic {
    /// Lease lifetime without sessions; renewed while sessions are active.
    #[serde(default, deserialize_with = "de_opt_duration")]
    pub ttl: Option<Duration>,
    /// Hard end of a lease, renewals included.
    #[serde(default, deserialize_with = "de_opt_duration")]
    pub max_ttl: Option<Duration>,
    /// SQL run in the lease's transaction after CREATE ROLE; `{role}` is the
    /// quoted role name.
    #[serde(default)]
    pub grants: Vec<String>,
    /// Database the grants (and DROP OWNED at revocation) run in; default
    /// the first of `databases`, else `postgres`.
    #[serde(default)]
    pub database: Option<String>,
    /// At revocation: REASSIGN OWNED BY the lease role TO this role before
    /// DROP OWNED; unset drops what the role owns.
    #[serde(default)]
    pub reassign_owned_to: Option<String>,
    /// Prefix of lease role names (`<prefix><workload>_<random>`).
    #[serde(default)]
    pub role_prefix: Option<String>,
    /// `group` (default) or `per_lease`: see [`GrantMode`].
    #[serde(default)]
    pub grant_mode: GrantMode,
    /// PBKDF2 iterations in lease roles' SCRAM verifiers (default
    /// [`DEFAULT_LEASE_SCRAM_ITERATIONS`]; see `pg::scram::verifier`).
    #[serde(default)]
    pub scram_iterations: Option<u32>,
    /// mysql routes: a MariaDB role each lease user is granted and gets as
    /// its default role (`GRANT role TO user; SET DEFAULT ROLE role FOR user`).
    #[serde(default)]
    pub role: Option<String>,
    /// redis routes: the ACL rules of each lease user (`ACL SETUSER user
    /// reset on >password <acl>`), e.g. `"~app:* +@read +@write -@dangerous"`.
    #[serde(default)]
    pub acl: Option<String>,
}

impl Dynamic {
    pub fn ttl(&self) -> Duration {
        self.ttl.unwrap_or(DEFAULT_LEASE_TTL)
    }
    pub fn max_ttl(&self) -> Duration {
        self.max_ttl
            .unwrap_or(DEFAULT_LEASE_MAX_TTL)
            .max(self.ttl())
    }
    pub fn role_prefix(&self) -> &str {
        self.role_prefix.as_deref().unwrap_or(DEFAULT_ROLE_PREFIX)
    }
    pub fn scram_iterations(&self) -> u32 {
        self.scram_iterations
            .unwrap_or(DEFAULT_LEASE_SCRAM_ITERATIONS)
    }
}

/// `route[i].credential`: the login, its secret and cache TTL, and `dynamic`.
pub(super) fn check_credential(c: &mut Checker<'_>, k: &str, r: &Route, cred: &Credential) {
    if r.kind == super::RouteKind::Redis {
        if cred
            .user
            .chars()
            .any(|ch| ch.is_whitespace() || ch.is_control())
        {
            c.error(
                format!("{k}.credential.user"),
                format!("credential.user {:?} contains a space or control character, which a Redis ACL user name cannot", cred.user),
                "set user to the ACL user warden logs in as (e.g. user = \"app\"), or remove it to send AUTH with the password alone",
            );
        }
    } else if cred.user.trim().is_empty() {
        c.error(
            format!("{k}.credential.user"),
            "credential.user is missing or empty",
            "set user to the database role warden logs in as, e.g. user = \"app\"",
        );
    }
    if let Err((problem, fix)) = check_secret_name(&cred.secret) {
        c.error(format!("{k}.credential.secret"), problem, fix);
    }
    check_cache_ttl(
        c,
        format!("{k}.credential.cache_ttl"),
        cred.cache_ttl,
        &cred.secret,
    );
    if let Some(d) = &cred.dynamic {
        check_dynamic(c, k, r, d);
    }
}

/// Rules for `route[i].credential.dynamic`.
fn check_dynamic(c: &mut Checker<'_>, k: &str, r: &Route, d: &Dynamic) {
    let k = format!("{k}.credential.dynamic");
    if d.role.is_some() && r.kind != super::RouteKind::Mysql {
        c.error(
            format!("{k}.role"),
            "role is only used by kind = \"mysql\" routes (a MariaDB role granted to each lease user)",
            "remove role and give the lease roles their privileges with grants = [\"GRANT ... TO {role}\"]",
        );
    }
    if d.acl.is_some() && r.kind != super::RouteKind::Redis {
        c.error(
            format!("{k}.acl"),
            "acl is only used by kind = \"redis\" routes (the ACL rules of each lease user)",
            "remove acl and give the lease roles their privileges with grants = [\"GRANT ... TO {role}\"]",
        );
    }
    if let Some(ttl) = d.ttl {
        if ttl < MIN_LEASE_TTL {
            c.error(
                format!("{k}.ttl"),
                format!(
                    "ttl {} is shorter than {}",
                    format_duration(ttl),
                    format_duration(MIN_LEASE_TTL)
                ),
                "set ttl to at least \"1s\" (default 1h)",
            );
        }
    }
    if let (Some(max), ttl) = (d.max_ttl, d.ttl()) {
        if max < ttl {
            c.error(
                format!("{k}.max_ttl"),
                format!(
                    "max_ttl {} is shorter than ttl {}",
                    format_duration(max),
                    format_duration(ttl)
                ),
                format!("set max_ttl to at least {}", format_duration(ttl)),
            );
        }
    }
    // Redis routes refuse grants (their lease users get `acl`).
    let grants: &[String] = if r.kind == super::RouteKind::Redis {
        &[]
    } else {
        &d.grants
    };
    for (j, g) in grants.iter().enumerate() {
        if !g.contains("{role}") {
            c.error(
                format!("{k}.grants[{j}]"),
                format!("grant \"{g}\" does not mention {{role}}, so it would not grant anything to the lease's role"),
                "write the statement with the placeholder, e.g. \"GRANT SELECT ON ALL TABLES IN SCHEMA public TO {role}\"",
            );
        }
        if g.contains(';') || g.contains('\0') {
            c.error(
                format!("{k}.grants[{j}]"),
                "a grant contains ';' or NUL; each list entry must be one statement",
                "split the text into one list entry per statement",
            );
        }
    }
    let prefix = d.role_prefix();
    let ok_prefix = !prefix.is_empty()
        && prefix.len() <= 20
        && prefix
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
        && !prefix.starts_with("pg_")
        && prefix.as_bytes()[0].is_ascii_lowercase();
    if !ok_prefix {
        c.error(
            format!("{k}.role_prefix"),
            format!("role_prefix \"{prefix}\" must start with a letter, use only a-z, 0-9 and _, be at most 20 characters and not start with pg_ (reserved by PostgreSQL)"),
            "use e.g. role_prefix = \"warden_\"",
        );
    }
    if let Some(n) = d.scram_iterations {
        if n == 0 || n > MAX_LEASE_SCRAM_ITERATIONS {
            c.error(
                format!("{k}.scram_iterations"),
                format!("scram_iterations {n} is outside 1..={MAX_LEASE_SCRAM_ITERATIONS}"),
                format!("remove it (default {DEFAULT_LEASE_SCRAM_ITERATIONS}: lease passwords are 256 random bits) or set e.g. 4096"),
            );
        }
    }
    for (key, v) in [
        ("database", &d.database),
        ("reassign_owned_to", &d.reassign_owned_to),
    ] {
        if let Some(v) = v {
            if v.is_empty() || v.len() > 63 || v.contains('\0') {
                c.error(
                    format!("{k}.{key}"),
                    format!("{key} \"{v}\" is not a PostgreSQL name (1 to 63 bytes, no NUL)"),
                    format!("set {key} to an existing name or remove it"),
                );
            }
        }
    }
    if let (Some(db), false) = (&d.database, r.databases.is_empty()) {
        if !r.databases.contains(db) {
            c.warn(
                format!("{k}.database"),
                format!("grants run in database \"{db}\", which is not in this route's databases"),
                "set database to one of route.databases, or add it there",
            );
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use crate::config::test_util::{edit, ok, only_error, report};

    #[test]
    fn postgres_route_needs_credential() {
        only_error(
            &edit(
                "credential = { user = \"app\", secret = \"orders-db/app\", cache_ttl = \"5m\" }\n",
                "",
            ),
            "route[0].credential",
        );
        let issue = only_error(&edit("user = \"app\", ", ""), "route[0].credential.user");
        assert!(issue.problem.contains("missing"), "{issue:?}");
        only_error(
            &edit("secret = \"orders-db/app\", ", ""),
            "route[0].credential.secret",
        );
        only_error(
            &edit("user = \"app\"", "user = \"\""),
            "route[0].credential.user",
        );
    }

    #[test]
    fn dynamic_credentials_are_checked_with_key_and_fix() {
        let with = |d: &str| {
            edit(
                "cache_ttl = \"5m\" }",
                &format!("cache_ttl = \"5m\", dynamic = {d} }}"),
            )
        };
        ok(&with(
            "{ ttl = \"1h\", grants = [\"GRANT SELECT ON t TO {role}\"] }",
        ));
        let i = only_error(
            &with("{ grants = [\"GRANT SELECT ON t TO app\"] }"),
            "route[0].credential.dynamic.grants[0]",
        );
        assert!(i.problem.contains("does not mention {role}"), "{i:?}");
        only_error(
            &with("{ grants = [\"GRANT x TO {role}; DROP TABLE y\"] }"),
            "route[0].credential.dynamic.grants[0]",
        );
        let i = only_error(
            &with("{ ttl = \"2h\", max_ttl = \"1h\" }"),
            "route[0].credential.dynamic.max_ttl",
        );
        assert!(i.fix.contains("at least 2h"), "{i:?}");
        only_error(
            &with("{ role_prefix = \"pg_x\" }"),
            "route[0].credential.dynamic.role_prefix",
        );
        only_error(
            &with("{ role_prefix = \"Bad-\" }"),
            "route[0].credential.dynamic.role_prefix",
        );
        // A MariaDB role is a mysql route's key.
        let i = only_error(
            &with("{ role = \"reader\" }"),
            "route[0].credential.dynamic.role",
        );
        assert!(i.fix.contains("grants"), "{i:?}");
        // Redis ACL rules are a redis route's key.
        let i = only_error(
            &with("{ acl = \"+get\" }"),
            "route[0].credential.dynamic.acl",
        );
        assert!(i.problem.contains("redis"), "{i:?}");
        let r = report(&with("{ tll = \"1h\" }"));
        assert!(r.to_string().contains("did you mean `ttl`"), "{r}");
    }
}
