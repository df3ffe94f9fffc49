//! `[[secret]]`: per-secret policy (rotation period, versions kept) and
//! `rotate`, how a rotation reaches the system that checks the secret; with
//! their checks.

use std::collections::HashMap;
use std::path::Path;
use std::time::Duration;

use serde::Deserialize;

use super::address::{is_loopback_host, parse_http_url, url_for_display};
use super::check::Checker;
use super::duration::{de_opt_duration, format_duration};
use super::globals::MAX_VERSIONS_LIMIT;
use super::names::check_secret_name;
use super::route::RouteKind;

/// Shortest accepted `secret[].rotation_period`.
pub const MIN_ROTATION_PERIOD: Duration = Duration::from_secs(60);

/// One `[[secret]]`: policy for a secret name.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SecretPolicy {
    /// Secret name, e.g. `orders-db/app`.
    pub name: String,
    /// How often the secret is rotated (at least 1m).
    #[serde(default, deserialize_with = "de_opt_duration")]
    pub rotation_period: Option<Duration>,
    /// Overrides `store.max_versions` for this secret.
    #[serde(default)]
    pub max_versions: Option<u32>,
    /// How warden changes the secret upstream when it rotates it (see `rotation.rs`).
    #[serde(default)]
    pub rotate: Option<Rotate>,
}

config_enum! {
    /// `secret[].rotate.method`.
    RotateMethod {
        /// `ALTER ROLE … PASSWORD` on the route's database, run by warden.
        Postgres => "postgres",
        /// `SET PASSWORD` for a mysql route's own account, run by warden.
        Mysql => "mysql",
        /// `ACL SETUSER` of a redis route's own user, run by warden.
        Redis => "redis",
        /// A program that gets the new value on stdin.
        Exec => "exec",
        /// An HTTP POST whose body is the new value.
        Webhook => "webhook",
    }
}

/// `secret[].rotate`: how a rotation reaches the system that checks the secret.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rotate {
    pub method: RotateMethod,
    /// postgres, mysql: the route whose `credential` uses this secret.
    #[serde(default)]
    pub route: Option<String>,
    /// exec: program and arguments (never the value; that comes on stdin).
    #[serde(default)]
    pub command: Vec<String>,
    /// webhook: `http://` or `https://` URL.
    #[serde(default)]
    pub url: Option<String>,
    /// Longest a hook or webhook may take (default 30 s).
    #[serde(default, deserialize_with = "de_opt_duration")]
    pub timeout: Option<Duration>,
}

pub(super) fn check_secrets(c: &mut Checker<'_>) {
    let cfg = c.config;
    let mut seen: HashMap<&str, usize> = HashMap::new();
    for (i, s) in cfg.secrets.iter().enumerate() {
        let k = format!("secret[{i}]");
        if let Err((problem, fix)) = check_secret_name(&s.name) {
            c.error(format!("{k}.name"), problem, fix);
        }
        if let Some(first) = seen.get(s.name.as_str()) {
            c.error(
                format!("{k}.name"),
                format!(
                    "secret \"{}\" already has a policy at secret[{first}]",
                    s.name
                ),
                "merge the two [[secret]] entries into one",
            );
        } else {
            seen.insert(s.name.as_str(), i);
        }
        if let Some(period) = s.rotation_period {
            if period < MIN_ROTATION_PERIOD {
                c.error(
                    format!("{k}.rotation_period"),
                    format!(
                        "rotation_period {} is shorter than the minimum {}",
                        format_duration(period),
                        format_duration(MIN_ROTATION_PERIOD)
                    ),
                    "set rotation_period to at least \"1m\"",
                );
            }
        }
        if let Some(rot) = &s.rotate {
            check_rotate(c, &k, s, rot);
        }
        if let Some(max) = s.max_versions {
            if !(1..=MAX_VERSIONS_LIMIT).contains(&max) {
                c.error(
                    format!("{k}.max_versions"),
                    format!("max_versions is {max}; it must be between 1 and {MAX_VERSIONS_LIMIT}"),
                    format!("set max_versions to a value from 1 to {MAX_VERSIONS_LIMIT}, or remove it to use store.max_versions"),
                );
            }
        }
    }
}

/// Rules for `secret[i].rotate`: each method has exactly the keys it uses.
fn check_rotate(c: &mut Checker<'_>, k: &str, s: &SecretPolicy, rot: &Rotate) {
    let cfg = c.config;
    let m = rot.method;
    let unused = |key: &str| {
        (
            format!("{k}.rotate.{key}"),
            format!("rotate.{key} is not used by method \"{m}\""),
            format!("remove {key} from secret[..].rotate"),
        )
    };
    let mut extra = Vec::new();
    if !matches!(
        m,
        RotateMethod::Postgres | RotateMethod::Mysql | RotateMethod::Redis
    ) && rot.route.is_some()
    {
        extra.push(unused("route"));
    }
    if m != RotateMethod::Exec && !rot.command.is_empty() {
        extra.push(unused("command"));
    }
    if m != RotateMethod::Webhook && rot.url.is_some() {
        extra.push(unused("url"));
    }
    for (key, problem, fix) in extra {
        c.error(key, problem, fix);
    }
    match m {
        RotateMethod::Postgres | RotateMethod::Mysql | RotateMethod::Redis => match &rot.route {
            None => c.error(
                format!("{k}.rotate.route"),
                format!("method \"{m}\" needs the route whose {}", match m {
                    RotateMethod::Mysql => "database holds the user",
                    RotateMethod::Redis => "server holds the ACL user",
                    _ => "database holds the role",
                }),
                format!("add route = \"NAME\" naming a {m} [[route]] whose credential.secret is this secret"),
            ),
            Some(name) => {
                let found = cfg.routes.iter().enumerate().find(|(_, r)| &r.name == name);
                match found {
                    None => c.error(
                        format!("{k}.rotate.route"),
                        format!("there is no route named \"{name}\""),
                        format!("name a {m} [[route]] defined in this file"),
                    ),
                    Some((j, r)) => {
                        let kind = match m {
                            RotateMethod::Mysql => RouteKind::Mysql,
                            RotateMethod::Redis => RouteKind::Redis,
                            _ => RouteKind::Postgres,
                        };
                        let uses = r.kind == kind
                            && r.credential.as_ref().is_some_and(|cr| cr.secret == s.name);
                        if !uses {
                            c.error(
                                format!("{k}.rotate.route"),
                                format!("route[{j}] (\"{name}\") is not a {m} route whose credential.secret is \"{}\", so warden would not know whose password to change", s.name),
                                format!("set route[{j}].credential.secret = \"{}\" or name the route that uses this secret", s.name),
                            );
                        }
                    }
                }
            }
        },
        RotateMethod::Exec => match rot.command.first() {
            None => c.error(
                format!("{k}.rotate.command"),
                "method \"exec\" needs a command",
                "add command = [\"/absolute/path/to/program\", \"arg\"]; the new value arrives on its stdin",
            ),
            Some(prog) if !Path::new(prog).is_absolute() => c.error(
                format!("{k}.rotate.command"),
                format!("program \"{prog}\" is not an absolute path, so which program runs would depend on $PATH"),
                "use an absolute path, e.g. command = [\"/usr/local/bin/set-token\"]",
            ),
            Some(_) => {}
        },
        RotateMethod::Webhook => match &rot.url {
            None => c.error(
                format!("{k}.rotate.url"),
                "method \"webhook\" needs a url",
                "add url = \"https://host/path\"; warden POSTs the new value as the body",
            ),
            Some(u) => match parse_http_url(u) {
                Err(problem) => c.error(
                    format!("{k}.rotate.url"),
                    format!("url \"{}\" {problem}", url_for_display(u)),
                    "use an http:// or https:// URL, e.g. url = \"https://vault-sync.internal/rotate\"",
                ),
                Ok(parsed) if !parsed.https && !is_loopback_host(&parsed.host) => c.error(
                    format!("{k}.rotate.url"),
                    format!("url \"{}\" is plain http to a non-loopback host: the new secret would cross the network unencrypted", url_for_display(u)),
                    "use an https:// URL (or a loopback http:// address)",
                ),
                Ok(_) => {}
            },
        },
    }
    if let Some(t) = rot.timeout {
        if t < Duration::from_secs(1) || t > Duration::from_secs(600) {
            c.error(
                format!("{k}.rotate.timeout"),
                format!("timeout {} is outside 1s..10m", format_duration(t)),
                "set timeout between \"1s\" and \"10m\", or remove it (default 30s)",
            );
        }
    }
    if s.rotation_period.is_none() {
        c.warn(
            format!("{k}.rotation_period"),
            format!("secret \"{}\" has a rotate method but no rotation_period, so it rotates only on `warden secret rotate`", s.name),
            "add rotation_period = \"24h\" (or another period) to rotate it automatically",
        );
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use crate::config::test_util::{edit, ok, only_error, report, BASE};

    #[test]
    fn rotate_methods_are_checked_with_key_and_fix() {
        let with = |rotate: &str| {
            edit(
                "rotation_period = \"1h\"\n",
                &format!("rotation_period = \"1h\"\nrotate = {rotate}\n"),
            )
        };
        ok(&with("{ method = \"postgres\", route = \"orders-db\" }"));
        let i = only_error(&with("{ method = \"postgres\" }"), "secret[0].rotate.route");
        assert!(i.fix.contains("route = \"NAME\""), "{i:?}");
        let i = only_error(
            &with("{ method = \"postgres\", route = \"nope\" }"),
            "secret[0].rotate.route",
        );
        assert!(i.problem.contains("no route named \"nope\""), "{i:?}");
        let i = only_error(
            &with("{ method = \"exec\", command = [\"set-token\"] }"),
            "secret[0].rotate.command",
        );
        assert!(i.problem.contains("not an absolute path"), "{i:?}");
        only_error(&with("{ method = \"exec\" }"), "secret[0].rotate.command");
        ok(&with(
            "{ method = \"exec\", command = [\"/usr/local/bin/set-token\", \"x\"] }",
        ));
        let i = only_error(
            &with("{ method = \"webhook\", url = \"http://hooks.example.org/r\" }"),
            "secret[0].rotate.url",
        );
        assert!(i.problem.contains("unencrypted"), "{i:?}");
        ok(&with(
            "{ method = \"webhook\", url = \"https://hooks.example.org/r\" }",
        ));
        ok(&with(
            "{ method = \"webhook\", url = \"http://127.0.0.1:9000/r\" }",
        ));
        only_error(
            &with("{ method = \"exec\", command = [\"/bin/x\"], url = \"https://a\" }"),
            "secret[0].rotate.url",
        );
        only_error(
            &with("{ method = \"exec\", command = [\"/bin/x\"], timeout = \"0s\" }"),
            "secret[0].rotate.timeout",
        );
        let r = report(&with("{ method = \"ldap\" }"));
        assert!(r.to_string().contains("secret[0].rotate.method"), "{r}");
        // A method without a period is allowed, with a warning.
        let c = ok(&edit(
            "rotation_period = \"1h\"\n",
            "rotate = { method = \"exec\", command = [\"/bin/x\"] }\n",
        ));
        assert_eq!(c.warnings[0].key, "secret[0].rotation_period");
    }

    #[test]
    fn secret_policies() {
        let dup = format!("{BASE}\n[[secret]]\nname = \"orders-db/app\"\n");
        only_error(&dup, "secret[1].name");
        only_error(
            &edit("name = \"orders-db/app\"", "name = \"orders-db//app\""),
            "secret[0].name",
        );
        let text = edit("rotation_period = \"1h\"", "rotation_period = \"30s\"")
            .replace("cache_ttl = \"5m\"", "cache_ttl = \"10s\"");
        only_error(&text, "secret[0].rotation_period");
        ok(&edit(
            "rotation_period = \"1h\"",
            "rotation_period = \"1m\"\nmax_versions = 1000",
        )
        .replace("cache_ttl = \"5m\"", "cache_ttl = \"1m\""));
        only_error(
            &edit(
                "rotation_period = \"1h\"",
                "rotation_period = \"1h\"\nmax_versions = 0",
            ),
            "secret[0].max_versions",
        );
        only_error(
            &edit(
                "rotation_period = \"1h\"",
                "rotation_period = \"1h\"\nmax_versions = 1001",
            ),
            "secret[0].max_versions",
        );
    }
}
