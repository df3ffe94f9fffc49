//! Per-family positives and decoys. Token bodies are generated (a fixed
//! pseudo-random sequence) so no real-looking secret sits in the source.

use super::*;

const ALNUM: &str = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
const UPPER: &str = "ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
const HEX: &str = "0123456789abcdef";
const B64: &str = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

fn rnd(alphabet: &str, n: usize, seed: u64) -> String {
    let a: Vec<char> = alphabet.chars().collect();
    let mut x = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            a[(x % a.len() as u64) as usize]
        })
        .collect()
}

fn scanner() -> Scanner {
    Scanner::new(RuleSet::builtin().unwrap()).unwrap()
}

fn ids(s: &Scanner, path: &str, text: &str) -> Vec<String> {
    s.scan_text(path, text, &mut Stats::default())
        .into_iter()
        .map(|f| f.rule_id)
        .collect()
}

fn pem(kind: &str) -> String {
    let body: Vec<String> = (0..6).map(|i| rnd(B64, 64, 900 + i)).collect();
    format!(
        "-----BEGIN {kind}-----\n{}\n-----END {kind}-----\n",
        body.join("\n")
    )
}

/// (family, file name, text) planted secrets; shared with the e2e corpus idea.
fn positives() -> Vec<(&'static str, &'static str, String)> {
    vec![
        ("aws", "a.py", format!("key = \"AKIA{}\"", rnd(UPPER, 16, 1))),
        ("aws", "b.env", format!("AWS_SECRET_ACCESS_KEY={}", rnd(B64, 40, 2))),
        ("gcp", "sa.json", format!("{{\"type\": \"service_account\", \"private_key\": \"-----BEGIN PRIVATE KEY-----\\n{}\\n-----END PRIVATE KEY-----\\n\"}}", rnd(B64, 64, 3))),
        ("azure", "app.config", format!("DefaultEndpointsProtocol=https;AccountName=acct;AccountKey={}==;EndpointSuffix=core.windows.net", rnd(B64, 86, 4))),
        ("azure", "sb.txt", format!("Endpoint=sb://ns.servicebus.windows.net/;SharedAccessKeyName=Root;SharedAccessKey={}=", rnd(B64, 43, 5))),
        ("github", "ci.yml", format!("token: ghp_{}", rnd(ALNUM, 36, 6))),
        ("github", "x.sh", format!("GH=gho_{}", rnd(ALNUM, 36, 7))),
        ("github", "y.sh", format!("T=ghs_{} U=ghu_{}", rnd(ALNUM, 36, 8), rnd(ALNUM, 36, 9))),
        ("github", "z.sh", format!("github_pat_{}_{}", rnd(ALNUM, 22, 10), rnd(ALNUM, 59, 11))),
        ("gitlab", "g.sh", format!("GITLAB=glpat-{}", rnd(ALNUM, 20, 12))),
        ("slack", "s.env", format!("SLACK_BOT_TOKEN=xoxb-1234567890-1234567890123-{}", rnd(ALNUM, 24, 13))),
        ("stripe", "p.js", format!("const k = process.env.K || 'rk_live_{}';", rnd(ALNUM, 24, 14))),
        ("stripe", "q.js", format!("stripe('sk_live_{}')", rnd(ALNUM, 24, 15))),
        ("twilio", "t.py", format!("TWILIO_AUTH_TOKEN = \"{}\"", rnd(HEX, 32, 16))),
        ("sendgrid", "m.py", format!("SG.{}.{}", rnd(ALNUM, 22, 17), rnd(ALNUM, 43, 18))),
        ("openai", "o.py", format!("openai.api_key = os.environ.get(\"OPENAI_API_KEY\", \"sk-proj-{}\")", rnd(ALNUM, 48, 19))),
        ("npm", ".npmrc", format!("//registry.npmjs.org/:_authToken=npm_{}", rnd(ALNUM, 36, 20))),
        ("pypi", ".pypirc", format!("password = pypi-AgEIcHlwaS5vcmc{}", rnd(ALNUM, 60, 21))),
        ("jwt", "j.txt", format!("Authorization: Bearer eyJ{}.eyJ{}.{}", rnd(ALNUM, 20, 22), rnd(ALNUM, 30, 23), rnd(ALNUM, 43, 24))),
        ("private-key", "id_rsa", pem("RSA PRIVATE KEY")),
        ("private-key", "id_ed25519", pem("OPENSSH PRIVATE KEY")),
        ("private-key", "k.pem", pem("PRIVATE KEY")),
        ("private-key", "enc.pem", pem("ENCRYPTED PRIVATE KEY")),
        ("private-key", "k.ppk", format!("PuTTY-User-Key-File-3: ssh-rsa\nEncryption: none\nComment: k\nPublic-Lines: 1\n{}\nPrivate-Lines: 2\n{}\n{}\nPrivate-MAC: {}\n", rnd(B64, 64, 25), rnd(B64, 64, 26), rnd(B64, 40, 27), rnd(HEX, 64, 28))),
        ("database", "db.py", format!("URL = \"postgres://app:{}@db.internal:5432/app\"", rnd(ALNUM, 16, 29))),
        ("database", "m.yml", format!("url: mysql://root:{}@10.0.0.5/shop", rnd(ALNUM, 12, 30))),
        ("database", "r.env", format!("REDIS_URL=redis://:{}@cache:6379/0", rnd(ALNUM, 14, 31))),
        ("database", "App.java", format!("String u = \"jdbc:postgresql://db:5432/app?user=app&password={}\";", rnd(ALNUM, 14, 32))),
        ("database", "conn.txt", format!("host=db port=5432 dbname=app user=app password={}", rnd(ALNUM, 14, 33))),
        ("database", ".pgpass", format!("db.internal:5432:app:app:{}", rnd(ALNUM, 14, 34))),
        ("database", "run.sh", format!("redis-server --requirepass {}", rnd(ALNUM, 14, 35))),
        ("assignment", ".env", format!("DB_PASSWORD={}", rnd(ALNUM, 20, 36))),
        ("assignment", "c.yaml", format!("client_secret: {}", rnd(B64, 32, 37))),
        ("assignment", "c.json", format!("{{\"api_key\": \"{}\"}}", rnd(ALNUM, 32, 38))),
        ("assignment", "c.toml", format!("token = \"{}\"", rnd(ALNUM, 32, 39))),
        ("assignment", "app.properties", format!("db.password={}", rnd(ALNUM, 18, 40))),
    ]
}

#[test]
fn builtin_rules_load_and_count() {
    let r = RuleSet::builtin().unwrap();
    assert!(r.rules.len() >= 100, "{} rules", r.rules.len());
    let mut ids: Vec<&str> = r.rules.iter().map(|r| r.id.as_str()).collect();
    ids.sort_unstable();
    let n = ids.len();
    ids.dedup();
    assert_eq!(n, ids.len(), "duplicate rule ids");
}

#[test]
fn every_planted_secret_is_found_by_its_family() {
    let s = scanner();
    for (family, path, text) in positives() {
        let found = s.scan_text(path, &text, &mut Stats::default());
        assert!(
            found.iter().any(|f| f.family == family),
            "{family} not found in {path}: {text:?} → {found:?}"
        );
        for f in &found {
            assert!(f.redacted.chars().count() <= 5, "{f:?}");
        }
    }
}

#[test]
fn provider_rule_is_not_hidden_by_a_name_rule() {
    let s = scanner();
    let text = format!(
        "SLACK_BOT_TOKEN = \"xoxb-1234567890-1234567890123-{}\"",
        rnd(ALNUM, 24, 50)
    );
    assert_eq!(ids(&s, "a.py", &text), vec!["slack-bot-token"]);
}

#[test]
fn decoys_do_not_match() {
    let s = scanner();
    let decoys = [
        // UUIDs and hashes under ordinary names
        "id = \"550e8400-e29b-41d4-a716-446655440000\"".to_string(),
        format!("\"integrity\": \"sha512-{}==\"", rnd(B64, 86, 60)),
        format!("checksum = \"{}\"", rnd(HEX, 64, 61)),
        format!("resolved \"https://registry.yarnpkg.com/a/-/a-1.0.0.tgz#{}\"", rnd(HEX, 40, 62)),
        format!("<img src=\"data:image/png;base64,{}\">", rnd(B64, 2000, 63)),
        // placeholders
        "DB_PASSWORD=changeme".into(),
        "password: <password>".into(),
        "DATABASE_URL=postgres://user:${DB_PASS}@localhost/db".into(),
        "api_key = \"your_api_key_here\"".into(),
        "token = \"xxxxxxxxxxxxxxxxxxxx\"".into(),
        "aws_access_key_id = AKIAIOSFODNN7EXAMPLE".into(),
        "SECRET_KEY={{ secret_key }}".into(),
        "password = \"hunter2\"".into(),
        "password = os.environ[\"DB_PASSWORD\"]".into(),
        "-----BEGIN PUBLIC KEY-----\nMFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAE\n-----END PUBLIC KEY-----".into(),
        "ghp_short".into(),
        "see https://example.com/docs".into(),
    ];
    for d in decoys {
        let found = ids(&s, "decoy.txt", &d);
        assert!(found.is_empty(), "decoy {d:?} matched {found:?}");
    }
}

#[test]
fn inline_allow_silences_the_line() {
    let s = scanner();
    let mut st = Stats::default();
    let text = format!("t = \"ghp_{}\"  # warden:allow", rnd(ALNUM, 36, 70));
    assert!(s.scan_text("a.py", &text, &mut st).is_empty());
    assert_eq!(st.suppressed_inline, 1);
}

#[test]
fn user_rules_add_override_and_allow() {
    let user = r#"
[allow]
paths = ["**/fixtures/**"]
rules = ["jwt"]

[[rule]]
id = "acme-token"
description = "ACME internal token"
family = "acme"
regex = '''\b(acme_[a-z0-9]{24})\b'''
keywords = ["acme_"]
"#;
    let s = Scanner::new(RuleSet::load(Some((user, "user.toml"))).unwrap()).unwrap();
    let tok = format!(
        "acme_{}",
        rnd("abcdefghijklmnopqrstuvwxyz0123456789", 24, 80)
    );
    assert_eq!(ids(&s, "a", &tok), vec!["acme-token"]);
    let jwt = format!(
        "eyJ{}.eyJ{}.{}",
        rnd(ALNUM, 20, 81),
        rnd(ALNUM, 20, 82),
        rnd(ALNUM, 30, 83)
    );
    assert!(ids(&s, "a", &jwt).is_empty());
    assert!(s.rules.allow.path("repo/tests/fixtures/a.env"));
    assert!(RuleSet::load(Some(("[[rule]]\nid = 1", "bad.toml"))).is_err());
}

#[test]
fn redaction_and_fingerprint() {
    assert_eq!(redact("supersecretvalue"), "su…ue");
    assert_eq!(redact("12345678"), "1…8");
    assert_eq!(redact("short"), "…");
    assert_eq!(fingerprint("r", "v"), fingerprint("r", "v"));
    assert_ne!(fingerprint("r", "v"), fingerprint("r2", "v"));
    assert_eq!(fingerprint("r", "v").len(), 64);
}

#[test]
fn globs() {
    let g = allow::Glob::new("**/*.lock").unwrap();
    assert!(g.matches("a/b/Cargo.lock") && g.matches("Cargo.lock"));
    assert!(!g.matches("a/lock.rs"));
    let g = allow::Glob::new("docs/*.md").unwrap();
    assert!(g.matches("repo/docs/a.md") && !g.matches("repo/docs/x/a.md"));
}

#[test]
fn entropy_classes() {
    assert_eq!(rules::char_class("deadbeef"), rules::CharClass::Hex);
    assert_eq!(rules::char_class("abcXYZ09"), rules::CharClass::Alnum);
    assert_eq!(rules::char_class("ab+/=_-"), rules::CharClass::Base64);
    assert_eq!(rules::char_class("p@ss!"), rules::CharClass::Ascii);
    assert!(rules::shannon_entropy("aaaa") < 0.01);
    assert!((rules::shannon_entropy("abcd") - 2.0).abs() < 1e-9);
}

#[test]
fn aws_key_pair_in_either_order_whatever_the_names() {
    let s = scanner();
    let id = format!("AKIA{}", rnd(UPPER, 16, 90));
    let secret = rnd(B64, 40, 91);
    let forward = format!("[default]\nkey_id = {id}\nsigning = {secret}\n");
    let found = s.scan_text("creds.ini", &forward, &mut Stats::default());
    let pair: Vec<_> = found
        .iter()
        .filter(|f| f.rule_id == "aws-access-key-pair")
        .collect();
    assert_eq!(pair.len(), 1, "{found:?}");
    assert_eq!((pair[0].line, pair[0].column), (3, 11));
    assert_eq!(
        pair[0].fingerprint,
        fingerprint("aws-access-key-pair", &secret)
    );
    assert!(found.iter().any(|f| f.rule_id == "aws-access-key-id"));
    let backward = format!("{{\"s\": \"{secret}\",\n \"i\": \"{id}\"}}");
    assert!(ids(&s, "c.json", &backward).contains(&"aws-access-key-pair".to_string()));
    // Named like AWS's own variable: one finding at the secret, the pair.
    let named = format!("AWS_ACCESS_KEY_ID={id}\nAWS_SECRET_ACCESS_KEY={secret}\n");
    let at_secret: Vec<_> = s
        .scan_text("a.env", &named, &mut Stats::default())
        .into_iter()
        .filter(|f| f.line == 2)
        .map(|f| f.rule_id)
        .collect();
    assert_eq!(at_secret, vec!["aws-access-key-pair"]);
    // A git SHA-1 next to a key ID is not a secret key.
    let sha = format!("key = {id}\ncommit = {}\n", rnd(HEX, 40, 92));
    assert!(!ids(&s, "a.txt", &sha).contains(&"aws-access-key-pair".to_string()));
    // Too far apart: no pair.
    let far = format!("k = {id}\n{}\ns = {secret}\n", "#\n".repeat(200));
    assert!(!ids(&s, "a.txt", &far).contains(&"aws-access-key-pair".to_string()));
}

#[test]
fn locate_finds_the_value_again_or_says_what_changed() {
    let s = scanner();
    let pw = rnd(ALNUM, 16, 95);
    let text =
        format!("# db\nDATABASE_URL=postgres://app:{pw}@db.internal:5432/orders?sslmode=require\n");
    let found = s.scan_text("app.env", &text, &mut Stats::default());
    assert_eq!(found.len(), 1, "{found:?}");
    let f = &found[0];
    let at = s.locate(&text, f).unwrap();
    assert_eq!(&text[at.value.clone()], pw);
    assert!(text[at.whole.clone()].starts_with("postgres://app:"));
    assert!(text[at.whole.clone()].ends_with("sslmode=require"));
    // The same value moved one line down: not found at the reported place.
    let moved = format!("\n{text}");
    assert!(matches!(
        s.locate(&moved, f),
        Err(LocateError::Moved { .. })
    ));
    // Another password at the same place: changed.
    let other = text.replace(&pw, &rnd(ALNUM, 16, 96));
    assert!(matches!(
        s.locate(&other, f),
        Err(LocateError::Changed { .. })
    ));
    let mut unknown = f.clone();
    unknown.rule_id = "no-such-rule".into();
    assert!(matches!(
        s.locate(&text, &unknown),
        Err(LocateError::UnknownRule(_))
    ));
}
