//! `warden scan` end to end: a planted tree with every family plus decoys, a
//! real git repository with a secret added then deleted, JSON and SARIF
//! output, exit codes, redaction and the baseline flow.

use serde_json::Value;
use std::path::Path;
use std::process::Command;
use warden_tests::warden_bin;

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
const AN: &str = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
const B64: &str = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

struct Out {
    code: i32,
    stdout: String,
    stderr: String,
}

fn scan(args: &[&str]) -> Out {
    let o = Command::new(warden_bin())
        .arg("scan")
        .args(args)
        .output()
        .unwrap();
    Out {
        code: o.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&o.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
    }
}

fn git(dir: &Path, args: &[&str]) {
    let st = Command::new("git")
        .arg("-C")
        .arg(dir)
        .args([
            "-c",
            "user.name=t",
            "-c",
            "user.email=t@t",
            "-c",
            "commit.gpgsign=false",
        ])
        .args(args)
        .status()
        .unwrap();
    assert!(st.success(), "git {args:?}");
}

/// (family, relative path, file text, the secret value)
fn planted() -> Vec<(&'static str, &'static str, String, String)> {
    let mut v = Vec::new();
    let mut add = |fam, path, text: String, secret: String| v.push((fam, path, text, secret));
    let s = format!("AKIA{}", rnd("ABCDEFGHIJKLMNOPQRSTUVWXYZ234567", 16, 1));
    add("aws", "src/aws.py", format!("KEY = \"{s}\"\n"), s);
    let s = rnd(B64, 64, 2);
    add("gcp", "sa.json", format!("{{\"private_key\": \"-----BEGIN PRIVATE KEY-----\\n{s}\\n-----END PRIVATE KEY-----\\n\"}}\n"), s);
    let s = format!("{}=", rnd(B64, 43, 3));
    add(
        "azure",
        "appsettings.txt",
        format!(
            "Endpoint=sb://n.servicebus.windows.net/;SharedAccessKeyName=R;SharedAccessKey={s}\n"
        ),
        s,
    );
    let s = format!("ghp_{}", rnd(AN, 36, 4));
    add(
        "github",
        ".github/workflows/ci.yml",
        format!("env:\n  GH: {s}\n"),
        s,
    );
    let s = format!("glpat-{}", rnd(AN, 20, 5));
    add(
        "gitlab",
        ".gitlab-ci.yml",
        format!("variables:\n  T: {s}\n"),
        s,
    );
    let s = format!("xoxb-1234567890-1234567890123-{}", rnd(AN, 24, 6));
    add("slack", "bot.env", format!("SLACK_BOT_TOKEN={s}\n"), s);
    let s = format!("rk_live_{}", rnd(AN, 24, 7));
    add(
        "stripe",
        "web/pay.js",
        format!("const k = process.env.K || '{s}';\n"),
        s,
    );
    let s = rnd("0123456789abcdef", 32, 8);
    add(
        "twilio",
        "sms.py",
        format!("TWILIO_AUTH_TOKEN = \"{s}\"\n"),
        s,
    );
    let s = format!("SG.{}.{}", rnd(AN, 22, 9), rnd(AN, 43, 10));
    add("sendgrid", "mail.rb", format!("key = '{s}'\n"), s);
    let s = format!("sk-proj-{}", rnd(AN, 48, 11));
    add(
        "openai",
        "ai.py",
        format!("k = os.environ.get(\"OPENAI_API_KEY\", \"{s}\")\n"),
        s,
    );
    let s = format!("npm_{}", rnd(AN, 36, 12));
    add(
        "npm",
        ".npmrc",
        format!("//registry.npmjs.org/:_authToken={s}\n"),
        s,
    );
    let s = format!("pypi-AgEIcHlwaS5vcmc{}", rnd(AN, 60, 13));
    add(
        "pypi",
        ".pypirc",
        format!("[pypi]\nusername = __token__\npassword = {s}\n"),
        s,
    );
    let s = format!(
        "eyJ{}.eyJ{}.{}",
        rnd(AN, 20, 14),
        rnd(AN, 30, 15),
        rnd(AN, 43, 16)
    );
    add("jwt", "req.http", format!("Authorization: Bearer {s}\n"), s);
    let s = (0..5)
        .map(|i| rnd(B64, 64, 20 + i))
        .collect::<Vec<_>>()
        .join("\n");
    add(
        "private-key",
        "keys/id_ed25519",
        format!("-----BEGIN OPENSSH PRIVATE KEY-----\n{s}\n-----END OPENSSH PRIVATE KEY-----\n"),
        s,
    );
    let s = rnd(AN, 16, 30);
    add(
        "database",
        "config/db.yml",
        format!("url: postgres://app:{s}@db.internal:5432/app\n"),
        s,
    );
    let s = rnd(AN, 14, 31);
    add(
        "database",
        ".env",
        format!("REDIS_URL=redis://:{s}@cache:6379/0\n"),
        s,
    );
    let s = rnd(AN, 20, 32);
    add(
        "assignment",
        "deploy/.env.production",
        format!("DB_PASSWORD={s}\n"),
        s,
    );
    v
}

const DECOYS: &[(&str, &str)] = &[
    (
        "ids.json",
        "{\"id\": \"550e8400-e29b-41d4-a716-446655440000\"}\n",
    ),
    (
        "example.env",
        "DB_PASSWORD=changeme\nAPI_TOKEN=<token>\nDATABASE_URL=postgres://u:${DB_PASS}@h/db\n",
    ),
    (
        "docs.md",
        "Use `aws_access_key_id = AKIAIOSFODNN7EXAMPLE` and token xxxxxxxxxxxxxxxxxxxx.\n",
    ),
];

fn decoy_lockfile() -> String {
    format!(
        "[[package]]\nname = \"a\"\nchecksum = \"{}\"\n\"integrity\": \"sha512-{}==\"\n",
        rnd("0123456789abcdef", 64, 40),
        rnd(B64, 86, 41)
    )
}

#[test]
fn planted_tree_recall_decoys_formats_baseline_and_history() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("repo");
    std::fs::create_dir_all(&root).unwrap();
    let planted = planted();
    for (_, path, text, _) in &planted {
        let p = root.join(path);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        // Several planted files share a name (.env): append.
        let mut old = std::fs::read_to_string(&p).unwrap_or_default();
        old.push_str(text);
        std::fs::write(&p, old).unwrap();
    }
    for (path, text) in DECOYS {
        std::fs::write(root.join(path), text).unwrap();
    }
    std::fs::write(root.join("Cargo.lock"), decoy_lockfile()).unwrap();
    std::fs::write(
        root.join("logo.html"),
        format!(
            "<img src=\"data:image/png;base64,{}\">\n",
            rnd(B64, 4000, 42)
        ),
    )
    .unwrap();
    std::fs::write(root.join("blob.bin"), b"\0\0AKIA").unwrap();
    std::fs::create_dir_all(root.join("node_modules/x")).unwrap();
    std::fs::write(
        root.join("node_modules/x/i.js"),
        format!("t='ghp_{}'", rnd(AN, 36, 43)),
    )
    .unwrap();

    // History: a secret added, then deleted.
    let gone = format!("ghp_{}", rnd(AN, 36, 99));
    git(&root, &["init", "-q", "-b", "main"]);
    std::fs::write(root.join("old.sh"), format!("export GH={gone}\n")).unwrap();
    git(&root, &["add", "old.sh"]);
    git(&root, &["commit", "-qm", "add"]);
    git(&root, &["rm", "-q", "old.sh"]);
    git(&root, &["commit", "-qm", "remove"]);
    git(&root, &["add", "-A"]);
    git(&root, &["commit", "-qm", "tree"]);

    let r = root.to_str().unwrap();
    let out = scan(&["--json", "--git", r]);
    assert_eq!(out.code, 1, "{}", out.stderr);
    let mut secrets: Vec<&str> = planted.iter().map(|p| p.3.as_str()).collect();
    secrets.push(&gone);
    for s in &secrets {
        assert!(
            !out.stdout.contains(s) && !out.stderr.contains(s),
            "secret printed"
        );
    }
    let v: Value = serde_json::from_str(&out.stdout).unwrap();
    let findings = v["findings"].as_array().unwrap();
    // Per-family recall = 100%: every planted file has a finding of its family.
    for (fam, path, _, _) in &planted {
        assert!(
            findings
                .iter()
                .any(|f| f["family"] == *fam && f["path"].as_str().unwrap().ends_with(path)),
            "{fam} in {path} missed: {findings:#?}"
        );
    }
    // Zero decoy hits.
    for f in findings {
        let p = f["path"].as_str().unwrap();
        for d in [
            "ids.json",
            "example.env",
            "docs.md",
            "Cargo.lock",
            "logo.html",
            "blob.bin",
            "node_modules",
        ] {
            assert!(!p.contains(d), "decoy hit: {f}");
        }
    }
    let hist: Vec<&Value> = findings
        .iter()
        .filter(|f| f["commit"].is_string())
        .collect();
    assert_eq!(hist.len(), 1, "{hist:#?}");
    assert!(hist[0]["path"].as_str().unwrap().ends_with("old.sh"));
    assert!(hist[0]["author_date"].is_string());
    assert!(v["stats"]["skipped_binary"].as_u64().unwrap() >= 1);
    assert!(v["stats"]["skipped_vendored"].as_u64().unwrap() >= 1);

    // SARIF 2.1.0
    let out = scan(&["--sarif", r]);
    assert_eq!(out.code, 1);
    let s: Value = serde_json::from_str(&out.stdout).unwrap();
    assert_eq!(s["version"], "2.1.0");
    assert!(s["$schema"].as_str().unwrap().contains("sarif"));
    assert!(
        s["runs"][0]["tool"]["driver"]["rules"]
            .as_array()
            .unwrap()
            .len()
            >= 100
    );
    let res = s["runs"][0]["results"].as_array().unwrap();
    assert!(!res.is_empty());
    for x in res {
        assert!(x["ruleId"].is_string());
        let loc = &x["locations"][0]["physicalLocation"];
        assert!(loc["artifactLocation"]["uri"].is_string());
        assert!(loc["region"]["startLine"].as_u64().unwrap() >= 1);
        assert!(x["partialFingerprints"].is_object());
    }
    for sec in &secrets {
        assert!(!out.stdout.contains(sec));
    }

    // Text report: redacted.
    let out = scan(&[r]);
    assert_eq!(out.code, 1);
    assert!(out.stdout.contains("finding(s)"));
    for sec in &secrets {
        assert!(!out.stdout.contains(sec) && !out.stderr.contains(sec));
    }

    // Baseline: everything known → exit 0; a new secret → exit 1 with just it.
    let base = tmp.path().join("baseline.json");
    let out = scan(&["--git", "--write-baseline", base.to_str().unwrap(), r]);
    assert_eq!(out.code, 1);
    let out = scan(&["--git", "--baseline", base.to_str().unwrap(), r]);
    assert_eq!(out.code, 0, "{}", out.stdout);
    std::fs::write(
        root.join("new.env"),
        format!("API_TOKEN={}\n", rnd(AN, 30, 77)),
    )
    .unwrap();
    let out = scan(&["--json", "--baseline", base.to_str().unwrap(), r]);
    assert_eq!(out.code, 1);
    let v: Value = serde_json::from_str(&out.stdout).unwrap();
    assert_eq!(v["findings"].as_array().unwrap().len(), 1, "{v:#}");

    // Clean tree → 0; usage errors → 2.
    let clean = tmp.path().join("clean");
    std::fs::create_dir_all(&clean).unwrap();
    std::fs::write(clean.join("a.txt"), "hello\n").unwrap();
    assert_eq!(scan(&[clean.to_str().unwrap()]).code, 0);
    assert_eq!(scan(&["/nonexistent/path"]).code, 2);
    assert_eq!(scan(&["--json", "--sarif", r]).code, 2);
    assert_eq!(scan(&[]).code, 2);
    let bad = tmp.path().join("bad.toml");
    std::fs::write(
        &bad,
        "[[rule]]\nid = \"x\"\ndescription = \"d\"\nregex = \"(\"\n",
    )
    .unwrap();
    assert_eq!(scan(&["--rules", bad.to_str().unwrap(), r]).code, 2);
}
