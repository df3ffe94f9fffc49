//! Tests of the route checks, through whole config texts.

use std::path::PathBuf;
use std::time::Duration;

use super::{ClientTls, PoolConfig, PoolReset, TlsRouteMode};
use crate::config::test_util::{
    edit, edit_text, error_keys, ok, only_error, report, warning_keys, BASE, HTTP_ROUTE,
};

#[test]
fn tls_server_mode_authorizes_spiffe_ids_and_is_for_tls_routes_only() {
    let base = "trust_domain = \"example.org\"\n\
        [[route]]\nname = \"in\"\nkind = \"tls\"\nmode = \"server\"\n\
        listen = \"127.0.0.1:8443\"\nupstream = \"127.0.0.1:5000\"\n";
    let c = ok(&format!(
        "{base}allow = [\"spiffe://example.org/billing\"]\n"
    ));
    assert_eq!(c.routes[0].mode, TlsRouteMode::Server);
    let i = only_error(
        &format!("{base}allow = [\"billing\"]\n"),
        "route[0].allow[0]",
    );
    assert!(i.problem.contains("not a SPIFFE ID"), "{i:?}");
    only_error(
        &format!("{base}allow = [\"spiffe://example.org/b\"]\nupstream_tls = {{ spiffe_id = \"spiffe://example.org/x\" }}\n"),
        "route[0].upstream_tls",
    );
    let r = report(
        &format!("{base}allow = [\"spiffe://example.org/b\"]\n")
            .replace("kind = \"tls\"", "kind = \"postgres\""),
    );
    assert!(r.errors.iter().any(|e| e.key == "route[0].mode"), "{r}");
}

#[test]
fn route_names_unique_and_valid() {
    let dup = format!(
        "{BASE}{}",
        edit_text(HTTP_ROUTE, "name = \"payments\"", "name = \"orders-db\"")
    );
    only_error(&dup, "route[1].name");
    only_error(
        &edit("name = \"orders-db\"", "name = \"Orders\""),
        "route[0].name",
    );
}

#[test]
fn listen_addresses_unique() {
    let text = format!(
        "{BASE}{}",
        edit_text(HTTP_ROUTE, "127.0.0.1:18080", "127.0.0.1:15432")
    );
    let issue = only_error(&text, "route[1].listen");
    assert!(issue.problem.contains("route[0]"), "{issue:?}");
    let issue = only_error(
        &edit(
            "listen = \"127.0.0.1:15432\"",
            "listen = \"127.0.0.1:9477\"",
        ),
        "route[0].listen",
    );
    assert!(issue.problem.contains("metrics.listen"), "{issue:?}");
    // Same port on another loopback address is a different socket.
    ok(&edit(
        "listen = \"127.0.0.1:15432\"",
        "listen = \"127.0.0.2:9477\"",
    ));
}

#[test]
fn non_loopback_listen_needs_opt_in() {
    let text = edit("listen = \"127.0.0.1:15432\"", "listen = \"0.0.0.0:15432\"");
    let issue = only_error(&text, "route[0].listen");
    assert!(issue.fix.contains("127.0.0.1"), "{issue:?}");
    assert!(issue.fix.contains("allow_non_loopback = true"), "{issue:?}");
    ok(&format!("{text}allow_non_loopback = true\n"));
    ok(&edit(
        "listen = \"127.0.0.1:15432\"",
        "listen = \"[::1]:15432\"",
    ));
    only_error(
        &edit("listen = \"127.0.0.1:15432\"", "listen = \"127.0.0.1:0\""),
        "route[0].listen",
    );
}

#[test]
fn allow_must_name_declared_workloads() {
    let issue = only_error(
        &edit("allow = [\"reports\"]", "allow = [\"reprots\"]"),
        "route[0].allow[0]",
    );
    assert!(issue.fix.contains("did you mean \"reports\""), "{issue:?}");
    let keys = error_keys(&edit(
        "allow = [\"reports\"]",
        "allow = [\"reports\", \"ghost\"]",
    ));
    assert_eq!(keys, vec!["route[0].allow[1]"]);
}

#[test]
fn empty_allow_is_a_warning() {
    let c = ok(&edit("allow = [\"reports\"]", "allow = []"));
    assert_eq!(warning_keys(&c), vec!["route[0].allow"]);
    assert!(c.warnings[0].problem.contains("refuses every client"));
    let c = ok(&edit("allow = [\"reports\"]\n", ""));
    assert_eq!(warning_keys(&c), vec!["route[0].allow"]);
}

#[test]
fn kernel_relay_is_a_postgres_route_bool() {
    assert_eq!(ok(BASE).routes[0].kernel_relay, None);
    assert!(ok(BASE).routes[0].kernel_relay_on(), "on by default");
    let with = |v: &str| {
        edit(
            "allow = [\"reports\"]\n",
            &format!("allow = [\"reports\"]\nkernel_relay = {v}\n"),
        )
    };
    assert_eq!(ok(&with("false")).routes[0].kernel_relay, Some(false));
    let r = report(&with("\"yes\""));
    assert!(r.to_string().contains("kernel_relay"), "{r}");
}

#[test]
fn client_tls_is_a_bool_or_require() {
    assert_eq!(ok(BASE).routes[0].client_tls, ClientTls::Off);
    let with = |v: &str| {
        edit(
            "allow = [\"reports\"]\n",
            &format!("allow = [\"reports\"]\nclient_tls = {v}\n"),
        )
    };
    assert_eq!(ok(&with("true")).routes[0].client_tls, ClientTls::Offer);
    assert_eq!(ok(&with("false")).routes[0].client_tls, ClientTls::Off);
    assert_eq!(
        ok(&with("\"require\"")).routes[0].client_tls,
        ClientTls::Require
    );
    let r = report(&with("\"always\""));
    assert!(r.to_string().contains("true, false or \"require\""), "{r}");
}

#[test]
fn postgres_route_pool_is_a_bool_or_a_table() {
    assert_eq!(ok(BASE).routes[0].pool, None);
    let with = |v: &str| {
        edit(
            "allow = [\"reports\"]\n",
            &format!("allow = [\"reports\"]\npool = {v}\n"),
        )
    };
    let p = ok(&with("false")).routes[0].pool.clone().unwrap();
    assert!(!p.enabled);
    let p = ok(&with(
        "{ max_idle = 4, idle_timeout = \"30s\", max_lifetime = \"10m\" }",
    ))
    .routes[0]
        .pool
        .clone()
        .unwrap();
    assert_eq!(
        p,
        PoolConfig {
            enabled: true,
            max_idle: Some(4),
            idle_timeout: Some(Duration::from_secs(30)),
            max_lifetime: Some(Duration::from_secs(600)),
            reset: PoolReset::Auto,
            reset_set: false,
        }
    );
    let p = ok(&with("{ reset = \"always\" }")).routes[0]
        .pool
        .clone()
        .unwrap();
    assert_eq!(p.reset, PoolReset::Always);
    let r = report(&with("{ reset = \"never\" }"));
    assert!(r.to_string().contains("auto"), "{r}");
    only_error(
        &with("{ idle_timeout = \"0s\" }"),
        "route[0].pool.idle_timeout",
    );
    let r = report(&with("{ max_idel = 4 }"));
    assert!(r.to_string().contains("max_idel"), "{r}");
    let r = report(&with("\"yes\""));
    assert!(r.to_string().contains("true, false, or a table"), "{r}");
}

#[test]
fn http_route_needs_inject_and_url() {
    let text = format!(
        "{BASE}{}",
        edit_text(
            HTTP_ROUTE,
            "inject = { header = \"Authorization\", value = \"Bearer {secret}\", secret = \"payments/token\" }\n",
            "",
        )
    );
    only_error(&text, "route[1].inject");
    let text = format!(
        "{BASE}{}",
        edit_text(
            HTTP_ROUTE,
            "\"https://payments.internal\"",
            "\"payments.internal:443\""
        )
    );
    only_error(&text, "route[1].upstream");
    let text = format!(
        "{BASE}{}",
        edit_text(HTTP_ROUTE, "\"Bearer {secret}\"", "\"Bearer token\"")
    );
    only_error(&text, "route[1].inject.value");
    let text = format!(
        "{BASE}{}",
        edit_text(HTTP_ROUTE, "\"Authorization\"", "\"Bad Header\"")
    );
    only_error(&text, "route[1].inject.header");
    let text = format!(
        "{BASE}{}",
        edit_text(
            HTTP_ROUTE,
            "\"https://payments.internal\"",
            "\"https://user:pw@payments.internal\""
        )
    );
    only_error(&text, "route[1].upstream");
}

#[test]
fn http_and_tls_route_keys_are_checked() {
    let inj = "inject = { header = \"Authorization\", value = \"Bearer {secret}\", secret = \"payments/token\" }";
    let http = |to: &str| format!("{BASE}{}", edit_text(HTTP_ROUTE, inj, to));
    only_error(
        &http("inject = { header = \"A\", query = \"k\", secret = \"payments/token\" }"),
        "route[1].inject",
    );
    only_error(
        &http(
            "inject = { basic_user = \"svc\", value = \"{secret}\", secret = \"payments/token\" }",
        ),
        "route[1].inject.value",
    );
    only_error(
        &http("inject = { basic_user = \"a:b\", secret = \"payments/token\" }"),
        "route[1].inject.basic_user",
    );
    only_error(
        &http("inject = { query = \"a b\", secret = \"payments/token\" }"),
        "route[1].inject.query",
    );
    ok(&http(
        "inject = { query = \"api_key\", secret = \"payments/token\" }",
    ));
    only_error(
        &http(&format!("{inj}\ntunnel = [\"github.com:443\"]")),
        "route[1].tunnel",
    );
    only_error(
        &http(&format!(
            "{inj}\nforward_proxy = true\ntunnel = [\"github.com\"]"
        )),
        "route[1].tunnel[0]",
    );
    only_error(
        &http(&format!("{inj}\nupstream_tls = {{ mode = \"require\" }}")),
        "route[1].upstream_tls.mode",
    );
    only_error(
        &http(&format!("{inj}\nrequest_timeout = \"0s\"")),
        "route[1].request_timeout",
    );
    ok(&http(&format!("{inj}\nfast_path = false")));
    // http routes take kernel_relay (joined local hops), tls routes do not.
    ok(&http(&format!("{inj}\nkernel_relay = false")));
    only_error(
        &http(&format!("{inj}\nforward_proxy = true\nfast_path = false")),
        "route[1].fast_path",
    );
    // Two forward proxies may share a listener; a reverse proxy may not.
    let second = HTTP_ROUTE.replace("\"payments\"", "\"payments-2\"");
    let fwd = |t: &str| t.replace("allow = [", "forward_proxy = true\nallow = [");
    ok(&format!("{BASE}{}{}", fwd(HTTP_ROUTE), fwd(&second)));
    only_error(
        &format!("{BASE}{}{}", fwd(HTTP_ROUTE), second),
        "route[2].listen",
    );
    // tls routes: verification always on, spiffe_id well formed and tls-only.
    let tls = "\n[[route]]\nname = \"logs\"\nkind = \"tls\"\nlisten = \"127.0.0.1:16514\"\nupstream = \"logs.internal:6514\"\nallow = [\"reports\"]\n";
    let with_tls = |extra: &str| format!("{BASE}{tls}{extra}\n");
    ok(&with_tls(
        "upstream_tls = { spiffe_id = \"spiffe://example.org/logs\" }",
    ));
    only_error(&with_tls("kernel_relay = true"), "route[1].kernel_relay");
    only_error(
        &with_tls("upstream_tls = { spiffe_id = \"https://x\" }"),
        "route[1].upstream_tls.spiffe_id",
    );
    let r = report(&with_tls("upstream_tls = { mode = \"require\" }"));
    assert!(
        r.errors
            .iter()
            .any(|i| i.key == "route[1].upstream_tls.mode"),
        "{r}"
    );
    only_error(
        &http(&format!(
            "{inj}\nupstream_tls = {{ spiffe_id = \"spiffe://example.org/x\" }}"
        )),
        "route[1].upstream_tls.spiffe_id",
    );
}

#[test]
fn credential_and_inject_belong_to_their_kinds() {
    let text = edit(
        "allow = [\"reports\"]",
        "allow = [\"reports\"]\ninject = { header = \"X\", value = \"{secret}\", secret = \"a\" }",
    );
    only_error(&text, "route[0].inject");
    let text = format!(
        "{BASE}{}",
        edit_text(
            HTTP_ROUTE,
            "allow = [\"reports\"]",
            "allow = [\"reports\"]\ncredential = { user = \"u\", secret = \"a\" }"
        )
    );
    only_error(&text, "route[1].credential");
}

#[test]
fn tls_disable_to_remote_host_is_a_warning() {
    let text = edit(
        "upstream = \"db.internal:5432\"",
        "upstream = \"db.internal:5432\"\nupstream_tls = { mode = \"disable\" }",
    );
    let c = ok(&text);
    assert_eq!(warning_keys(&c), vec!["route[0].upstream_tls.mode"]);
    let text = edit(
        "upstream = \"db.internal:5432\"",
        "upstream = \"127.0.0.1:5432\"\nupstream_tls = { mode = \"disable\" }",
    );
    assert!(ok(&text).warnings.is_empty());
    let text = format!(
        "{BASE}{}",
        edit_text(
            HTTP_ROUTE,
            "\"https://payments.internal\"",
            "\"http://payments.internal\""
        )
    );
    assert_eq!(warning_keys(&ok(&text)), vec!["route[1].upstream"]);
}

#[test]
fn unix_socket_only_for_postgres() {
    let c = ok(&edit(
        "allow = [\"reports\"]",
        "allow = [\"reports\"]\nunix_socket = \"pg\"",
    ));
    assert_eq!(
        c.routes[0].unix_socket,
        Some(PathBuf::from("/etc/warden/pg"))
    );
    let text = format!(
        "{BASE}{}",
        edit_text(
            HTTP_ROUTE,
            "allow = [\"reports\"]",
            "allow = [\"reports\"]\nunix_socket = \"/run/warden/x\""
        )
    );
    only_error(&text, "route[1].unix_socket");
}

#[test]
fn cache_ttl_longer_than_rotation_is_an_error() {
    let issue = only_error(
        &edit("cache_ttl = \"5m\"", "cache_ttl = \"2h\""),
        "route[0].credential.cache_ttl",
    );
    assert_eq!(
        issue.problem,
        "cache_ttl 2h is longer than the rotation period 1h of secret \"orders-db/app\" (secret[0].rotation_period): clients would keep using a rotated-out credential"
    );
    assert_eq!(
        issue.fix,
        "set cache_ttl to at most 1h or lengthen the rotation period"
    );
    // Equal is fine; no rotation period means no limit.
    ok(&edit("cache_ttl = \"5m\"", "cache_ttl = \"60m\""));
    ok(&edit("rotation_period = \"1h\"\n", ""));
}

#[test]
fn inject_cache_ttl_is_checked_too() {
    let text = format!(
        "{BASE}\n[[secret]]\nname = \"payments/token\"\nrotation_period = \"10m\"\n{}",
        edit_text(
            HTTP_ROUTE,
            "secret = \"payments/token\"",
            "secret = \"payments/token\", cache_ttl = \"11m\""
        )
    );
    let issue = only_error(&text, "route[1].inject.cache_ttl");
    assert!(
        issue.problem.contains("(secret[1].rotation_period)"),
        "{issue:?}"
    );
}
