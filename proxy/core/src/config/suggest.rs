//! Wording that helps fix a shape error: serde messages in plain words, the
//! expected form of every key (`KEY_HINTS`), where a misplaced key belongs, and
//! "did you mean" by edit distance.

use super::repair::last_key;

pub(super) fn friendly_serde_message(message: &str) -> String {
    let mut out = message.to_string();
    for (from, to) in [
        ("expected u8", "expected a whole number from 0 to 255"),
        ("expected u16", "expected a whole number from 0 to 65535"),
        (
            "expected u32",
            "expected a whole number from 0 to 4294967295",
        ),
        ("expected u64", "expected a non-negative whole number"),
        ("expected a sequence", "expected a list [..]"),
        ("expected struct ", "expected a table: "),
        ("invalid type: map", "invalid type: table"),
        ("invalid type: sequence", "invalid type: list"),
    ] {
        out = out.replace(from, to);
    }
    out
}

pub(super) fn unknown_key_fix(field: &str, valid: &[&str]) -> String {
    let here = if valid.is_empty() {
        String::new()
    } else {
        format!("valid keys here: {}", valid.join(", "))
    };
    if let Some(best) = closest(field, valid, 2) {
        return format!("did you mean `{best}`? {here}");
    }
    let elsewhere: Vec<String> = KEY_HINTS
        .iter()
        .filter(|(shape, _)| last_key(shape) == field && shape.contains('.'))
        .map(|(shape, _)| parent_shape(shape))
        .collect();
    if !elsewhere.is_empty() {
        return format!(
            "`{field}` belongs in {}, not here; move it there or remove it. {here}",
            elsewhere.join(" or ")
        );
    }
    if here.is_empty() {
        "remove it".to_string()
    } else {
        format!("remove it or use one of the {here}")
    }
}

/// "route.credential.cache_ttl" -> "[[route]] credential"; "metrics.listen" -> "[metrics]".
fn parent_shape(shape: &str) -> String {
    let parent = shape.rsplit_once('.').map_or("", |(p, _)| p);
    let (head, tail) = parent.split_once('.').unwrap_or((parent, ""));
    let table = if matches!(head, "workload" | "secret" | "route") {
        format!("[[{head}]]")
    } else {
        format!("[{head}]")
    };
    if tail.is_empty() {
        table
    } else {
        format!("{table} {tail}")
    }
}

/// Expected form of a key, by its path with array indexes removed.
const KEY_HINTS: &[(&str, &str)] = &[
    ("", "a TOML table of settings"),
    ("data_dir", "a directory path in quotes, e.g. data_dir = \"/var/lib/warden\""),
    ("trust_domain", "a domain name in quotes, e.g. trust_domain = \"example.org\""),
    ("environment", "a name in quotes, e.g. environment = \"prod\""),
    ("session_threads", "a whole number, e.g. session_threads = 2"),
    ("admin", "a table: [admin] with socket and group"),
    ("admin.socket", "a socket path in quotes, e.g. socket = \"/run/warden/admin.sock\""),
    ("admin.group", "a group name in quotes, e.g. group = \"warden-admin\""),
    ("metrics", "a table: [metrics] with listen"),
    ("metrics.listen", "an IP:PORT in quotes, e.g. listen = \"127.0.0.1:9477\", or \"off\""),
    ("store", "a table: [store] with max_versions, backend, url, password_file, password_credential, tls, ca_file, stale_if_error"),
    ("store.max_versions", "a whole number from 1 to 1000 without quotes, e.g. max_versions = 10"),
    ("store.backend", "one of \"sqlite\", \"postgres\""),
    ("store.url", "a PostgreSQL URL in quotes without a password, e.g. url = \"postgresql://warden@db.example.com:5432/warden\""),
    ("store.password_file", "a file path in quotes, e.g. password_file = \"/etc/warden/store-password\""),
    ("store.password_credential", "a systemd credential name in quotes, e.g. password_credential = \"warden-store-password\""),
    ("store.tls", "one of \"verify-full\", \"verify-ca\", \"disable\""),
    ("store.ca_file", "a file path in quotes, e.g. ca_file = \"/etc/warden/store-ca.pem\""),
    ("store.stale_if_error", "a duration in quotes of at most 1d, e.g. stale_if_error = \"10m\", or \"0s\""),
    ("identity", "a table: [identity] with svid_ttl, key_type, ca_ttl, workload_api_socket"),
    ("identity.ca_ttl", "a duration in quotes, at least 6x svid_ttl, e.g. ca_ttl = \"30d\""),
    ("identity.svid_ttl", "a duration in quotes between 1m and 30d, e.g. svid_ttl = \"1h\""),
    ("identity.key_type", "one of \"ec-p256\", \"ed25519\", \"ml-dsa-65\""),
    ("identity.workload_api_socket", "a socket path in quotes, e.g. workload_api_socket = \"/run/warden/workload.sock\""),
    ("monitor", "a table: [monitor] with ebpf and protect_upstreams"),
    ("audit", "a table: [audit] with sync and sync_interval"),
    ("audit.sync", "one of \"commit\", \"interval\""),
    ("audit.sync_interval", "a duration in quotes from 1ms to 1s, e.g. sync_interval = \"10ms\""),
    ("monitor.ebpf", "one of \"auto\", \"required\", \"off\""),
    ("monitor.protect_upstreams", "one of \"off\", \"observe\", \"enforce\""),
    ("workload", "a list of tables: write each one as [[workload]] (double brackets)"),
    ("workload.name", "a name in quotes of lowercase letters, digits, - and _, e.g. name = \"reports\""),
    ("workload.spiffe_id", "a SPIFFE ID in quotes, e.g. spiffe_id = \"spiffe://example.org/reports\""),
    ("workload.selectors", "an inline table, e.g. selectors = { uid = 1001, exe_path = \"/usr/bin/psql\" }"),
    ("workload.selectors.uid", "a numeric user id without quotes, e.g. uid = 1001"),
    ("workload.selectors.gid", "a numeric group id without quotes, e.g. gid = 1001"),
    ("workload.selectors.exe_path", "an absolute path in quotes, e.g. exe_path = \"/usr/bin/psql\""),
    ("workload.selectors.exe_sha256", "the 64 hex characters printed by `sha256sum`, in quotes"),
    ("workload.selectors.systemd_unit", "a unit name in quotes, e.g. systemd_unit = \"reports.service\""),
    ("workload.selectors.cgroup", "a cgroup path in quotes, e.g. cgroup = \"/system.slice/reports.service\""),
    ("secret", "a list of tables: write each one as [[secret]] (double brackets)"),
    ("secret.name", "a secret name in quotes, e.g. name = \"orders-db/app\""),
    ("secret.rotation_period", "a duration in quotes of at least 1m, e.g. rotation_period = \"24h\""),
    ("secret.max_versions", "a whole number from 1 to 1000 without quotes, e.g. max_versions = 5"),
    ("secret.rotate", "an inline table, e.g. rotate = { method = \"postgres\", route = \"orders-db\" }"),
    ("secret.rotate.method", "one of \"postgres\", \"mysql\", \"redis\", \"exec\", \"webhook\""),
    ("secret.rotate.route", "the name of a postgres or mysql route in quotes, e.g. route = \"orders-db\""),
    ("secret.rotate.command", "a list: program path then arguments, e.g. command = [\"/usr/local/bin/set-token\"]"),
    ("secret.rotate.url", "an http:// or https:// URL in quotes, e.g. url = \"http://127.0.0.1:9000/rotate\""),
    ("secret.rotate.timeout", "a duration in quotes, e.g. timeout = \"30s\""),
    ("route", "a list of tables: write each one as [[route]] (double brackets)"),
    ("route.name", "a name in quotes of lowercase letters, digits, - and _, e.g. name = \"orders-db\""),
    ("route.kind", "one of \"postgres\", \"http\", \"tls\", \"redis\", \"mysql\""),
    ("route.listen", "an IP:PORT in quotes, e.g. listen = \"127.0.0.1:15432\""),
    ("route.unix_socket", "a socket path in quotes, e.g. unix_socket = \"/run/warden/pg\""),
    ("route.upstream", "host:port in quotes for postgres, tls, redis and mysql (e.g. \"db.internal:5432\"), or an http:// or https:// URL for http"),
    ("route.upstream_tls", "an inline table, e.g. upstream_tls = { mode = \"verify-full\", ca_file = \"/etc/warden/db-ca.pem\" }"),
    ("route.upstream_tls.mode", "one of \"disable\", \"require\", \"verify-ca\", \"verify-full\""),
    ("route.upstream_tls.ca_file", "a file path in quotes, e.g. ca_file = \"/etc/warden/db-ca.pem\""),
    ("route.credential", "an inline table, e.g. credential = { user = \"app\", secret = \"orders-db/app\", cache_ttl = \"5m\" }"),
    ("route.credential.user", "a database user name in quotes (redis: an ACL user, optional), e.g. user = \"app\""),
    ("route.credential.secret", "a secret name in quotes, e.g. secret = \"orders-db/app\""),
    ("route.credential.cache_ttl", "a duration in quotes, e.g. cache_ttl = \"5m\""),
    ("route.credential.dynamic", "a table, e.g. dynamic = { ttl = \"1h\", max_ttl = \"24h\", grants = [\"GRANT SELECT ON ALL TABLES IN SCHEMA public TO {role}\"] }"),
    ("route.credential.dynamic.ttl", "a duration in quotes, e.g. ttl = \"1h\""),
    ("route.credential.dynamic.max_ttl", "a duration in quotes, at least ttl, e.g. max_ttl = \"24h\""),
    ("route.credential.dynamic.grants", "a list of SQL statements using {role}, e.g. grants = [\"GRANT USAGE ON SCHEMA app TO {role}\"]"),
    ("route.credential.dynamic.database", "a database name in quotes, e.g. database = \"orders\""),
    ("route.credential.dynamic.reassign_owned_to", "a role name in quotes, e.g. reassign_owned_to = \"app_owner\""),
    ("route.credential.dynamic.grant_mode", "\"group\" or \"per_lease\", e.g. grant_mode = \"group\""),
    ("route.credential.dynamic.scram_iterations", "a whole number from 1 to 1000000, e.g. scram_iterations = 16"),
    ("route.credential.dynamic.role", "a MariaDB role name in quotes (mysql routes), e.g. role = \"orders_reader\""),
    ("route.credential.dynamic.acl", "Redis ACL rules in quotes (redis routes), e.g. acl = \"~app:* +@read +@write -@dangerous\""),
    ("route.credential.dynamic.role_prefix", "lowercase letters, digits and _ in quotes, e.g. role_prefix = \"warden_\""),
    ("route.inject", "an inline table, e.g. inject = { header = \"Authorization\", value = \"Bearer {secret}\", secret = \"payments/api-token\" }"),
    ("route.inject.header", "an HTTP header name in quotes, e.g. header = \"Authorization\""),
    ("route.inject.value", "text in quotes containing {secret}, e.g. value = \"Bearer {secret}\""),
    ("route.inject.secret", "a secret name in quotes, e.g. secret = \"payments/api-token\""),
    ("route.inject.cache_ttl", "a duration in quotes, e.g. cache_ttl = \"5m\""),
    ("route.allow", "a list of workload names, e.g. allow = [\"reports\"]"),
    ("route.allow_non_loopback", "true or false, without quotes"),
    ("route.mode", "\"client\" or \"server\" (tls routes), e.g. mode = \"server\""),
    ("route.server_names", "a list of DNS names or IPs in quotes, e.g. server_names = [\"node1.example.org\"]"),
    ("route.client_tls", "true or false without quotes, or \"require\", e.g. client_tls = \"require\""),
    ("route.databases", "a list of database names, e.g. databases = [\"orders\"]"),
    ("route.connect_timeout", "a duration in quotes, e.g. connect_timeout = \"5s\""),
    ("route.forward_proxy", "true or false, without quotes"),
    ("route.tunnel", "a list of host:port in quotes, e.g. tunnel = [\"github.com:443\"]"),
    ("route.request_timeout", "a duration in quotes, e.g. request_timeout = \"30s\""),
    ("route.fast_path", "true or false, without quotes"),
    ("route.kernel_relay", "true or false, without quotes"),
    ("route.deny_commands", "a list of Redis command names in quotes, e.g. deny_commands = [\"CONFIG\", \"FLUSHALL\", \"KEYS\"]"),
    ("route.allow_commands", "a list of Redis command names in quotes, e.g. allow_commands = [\"GET\", \"SET\", \"DEL\"]"),
    ("route.pool", "true, false, or an inline table, e.g. pool = { max_idle = 16, idle_timeout = \"60s\", max_lifetime = \"1h\" }"),
    ("route.pool.max_idle", "a whole number without quotes, e.g. max_idle = 16 (0 disables the pool)"),
    ("route.pool.idle_timeout", "a duration in quotes, e.g. idle_timeout = \"60s\""),
    ("route.pool.max_lifetime", "a duration in quotes, e.g. max_lifetime = \"1h\""),
    ("route.pool.reset", "\"auto\" (no reset after a state-free session) or \"always\", e.g. reset = \"always\""),
    ("route.upstream_tls.spiffe_id", "a SPIFFE ID in quotes, e.g. spiffe_id = \"spiffe://example.org/logs\""),
    ("route.inject.query", "a query parameter name in quotes, e.g. query = \"api_key\""),
    ("route.inject.basic_user", "a user name in quotes, e.g. basic_user = \"svc-billing\""),
    ("anomaly", "a table: [anomaly] with webhook and distinct_secrets_per_minute"),
    ("anomaly.webhook", "an http:// or https:// URL in quotes, e.g. webhook = \"http://127.0.0.1:9000/alerts\""),
    ("anomaly.distinct_secrets_per_minute", "an inline table, e.g. distinct_secrets_per_minute = { limit = 100, action = \"freeze\" }"),
    ("anomaly.distinct_secrets_per_minute.limit", "a whole number of at least 1 without quotes, e.g. limit = 100"),
    ("anomaly.distinct_secrets_per_minute.action", "one of \"log\", \"alert\", \"freeze\""),
    ("anomaly.enabled", "true or false, without quotes"),
    ("anomaly.suspend", "true or false, without quotes"),
    ("anomaly.session_rate", "an inline table, e.g. session_rate = { interval = \"10s\", warmup = 30, sigmas = 4, min_sessions = 20, action = \"alert\" }"),
    ("anomaly.session_rate.interval", "a duration in quotes, e.g. interval = \"10s\""),
    ("anomaly.session_rate.warmup", "a whole number of intervals without quotes, e.g. warmup = 30"),
    ("anomaly.session_rate.sigmas", "a whole number without quotes, e.g. sigmas = 4"),
    ("anomaly.session_rate.min_sessions", "a whole number without quotes, e.g. min_sessions = 20"),
    ("anomaly.session_rate.action", "one of \"log\", \"alert\", \"freeze\""),
    ("anomaly.new_executable", "an inline table, e.g. new_executable = { stable_after = \"10m\", action = \"alert\" }"),
    ("anomaly.new_executable.stable_after", "a duration in quotes, e.g. stable_after = \"10m\""),
    ("anomaly.new_executable.action", "one of \"log\", \"alert\", \"freeze\""),
    ("anomaly.denials_per_minute", "an inline table, e.g. denials_per_minute = { limit = 10, action = \"alert\" }"),
    ("anomaly.denials_per_minute.limit", "a whole number of at least 1 without quotes, e.g. limit = 10"),
    ("anomaly.denials_per_minute.action", "one of \"log\", \"alert\", \"freeze\""),
    ("anomaly.bypass", "an inline table, e.g. bypass = { action = \"alert\" }"),
    ("anomaly.bypass.action", "one of \"log\", \"alert\", \"freeze\""),
    ("export", "a table: [export] with queue, rate_per_workload, burst and [[export.sink]] entries"),
    ("export.queue", "a whole number without quotes, e.g. queue = 8192"),
    ("export.rate_per_workload", "records per second as a whole number without quotes, e.g. rate_per_workload = 100 (0: no limit)"),
    ("export.burst", "a whole number without quotes, e.g. burst = 200"),
    ("export.sink", "a list of tables: write each one as [[export.sink]] (double brackets)"),
    ("export.sink.name", "a name in quotes of lowercase letters, digits, - and _, e.g. name = \"siem\""),
    ("export.sink.kind", "one of \"file\", \"journald\", \"syslog\", \"otlp\""),
    ("export.sink.carries", "a list of \"events\" and \"audit\", e.g. carries = [\"events\", \"audit\"]"),
    ("export.sink.path", "a file path in quotes, e.g. path = \"/var/log/warden/export.jsonl\""),
    ("export.sink.max_bytes", "a size in bytes without quotes, e.g. max_bytes = 104857600 (0: never rotate)"),
    ("export.sink.keep", "a whole number from 1 to 100 without quotes, e.g. keep = 5"),
    ("export.sink.socket", "a socket path in quotes, e.g. socket = \"/run/systemd/journal/socket\""),
    ("export.sink.address", "\"unix:/dev/log\", \"udp:HOST:PORT\" or \"tcp:HOST:PORT\" in quotes"),
    ("export.sink.facility", "one of \"auth\", \"authpriv\", \"daemon\", \"user\", \"local0\" … \"local7\""),
    ("export.sink.endpoint", "an http:// or https:// URL in quotes, e.g. endpoint = \"http://127.0.0.1:4318/v1/logs\""),
    ("export.sink.headers", "an inline table of header names to a string or { file = \"PATH\" }, e.g. headers = { Authorization = { file = \"/etc/warden/otlp-auth\" } }"),
    ("export.sink.timeout", "a duration in quotes, e.g. timeout = \"5s\""),
    ("anomaly.workloads", "a table per workload, e.g. [anomaly.workloads.reports] with the same rule keys as [anomaly]"),
];

/// Hint for a concrete key such as `route[3].credential.cache_ttl`.
pub(super) fn key_hint(key: &str) -> Option<&'static str> {
    let mut shape = String::with_capacity(key.len());
    let mut in_index = false;
    for c in key.chars() {
        match c {
            '[' => in_index = true,
            ']' => in_index = false,
            _ if !in_index => shape.push(c),
            _ => {}
        }
    }
    KEY_HINTS
        .iter()
        .find(|(s, _)| *s == shape)
        .map(|(_, hint)| *hint)
}

/// Optimal string alignment distance (Levenshtein plus adjacent transposition).
fn edit_distance(a: &str, b: &str) -> usize {
    let a: Vec<char> = a.chars().collect();
    let b: Vec<char> = b.chars().collect();
    let width = b.len() + 1;
    let mut d = vec![0usize; (a.len() + 1) * width];
    for i in 0..=a.len() {
        d[i * width] = i;
    }
    for (j, cell) in d.iter_mut().enumerate().take(width) {
        *cell = j;
    }
    for i in 1..=a.len() {
        for j in 1..=b.len() {
            let cost = usize::from(a[i - 1] != b[j - 1]);
            let mut best = (d[(i - 1) * width + j] + 1)
                .min(d[i * width + j - 1] + 1)
                .min(d[(i - 1) * width + j - 1] + cost);
            if i > 1 && j > 1 && a[i - 1] == b[j - 2] && a[i - 2] == b[j - 1] {
                best = best.min(d[(i - 2) * width + j - 2] + 1);
            }
            d[i * width + j] = best;
        }
    }
    d[a.len() * width + b.len()]
}

/// The candidate nearest to `word`, if within `max` edits (first wins ties).
pub(super) fn closest<'a>(word: &str, candidates: &[&'a str], max: usize) -> Option<&'a str> {
    candidates
        .iter()
        .map(|c| (edit_distance(word, c), *c))
        .filter(|(dist, _)| *dist <= max)
        .min_by_key(|(dist, _)| *dist)
        .map(|(_, c)| c)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::{closest, edit_distance};

    #[test]
    fn edit_distance_and_suggestions() {
        assert_eq!(edit_distance("lisen", "listen"), 1);
        assert_eq!(edit_distance("lsiten", "listen"), 1);
        assert_eq!(edit_distance("", "abc"), 3);
        assert_eq!(closest("uplink", &["upstream", "listen"], 2), None);
        assert_eq!(closest("alow", &["allow", "listen"], 2), Some("allow"));
    }
}
