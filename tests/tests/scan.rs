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

// ---- SARIF schema ------------------------------------------------------------

/// Python with `jsonschema` (PyPI) in a venv cached under the temp dir.
fn python_with_jsonschema() -> std::path::PathBuf {
    let venv = std::env::temp_dir().join("warden-jsonschema-venv");
    let py = venv.join("bin/python");
    let works = |p: &Path| {
        Command::new(p)
            .args(["-c", "import jsonschema; jsonschema.Draft202012Validator"])
            .status()
            .map(|s| s.success())
            .unwrap_or(false)
    };
    if works(&py) {
        return py;
    }
    let staging = std::env::temp_dir().join(format!("warden-jsonschema-{}", std::process::id()));
    let ok = Command::new("python3")
        .args(["-m", "venv"])
        .arg(&staging)
        .status()
        .unwrap()
        .success();
    assert!(ok, "python3 -m venv failed (Debian package python3-venv)");
    let ok = Command::new(staging.join("bin/pip"))
        .args(["install", "--quiet", "jsonschema>=4.18", "rfc3987"])
        .status()
        .unwrap()
        .success();
    assert!(ok, "pip install jsonschema failed (PyPI must be reachable)");
    let _ = std::fs::rename(&staging, &venv);
    if works(&py) {
        py
    } else {
        staging.join("bin/python")
    }
}

const VALIDATE_PY: &str = r#"
import json, sys
import jsonschema
schema = json.load(open(sys.argv[1]))
doc = json.load(open(sys.argv[2]))
v = jsonschema.Draft202012Validator(schema, format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER)
errors = sorted(v.iter_errors(doc), key=lambda e: list(e.absolute_path))
for e in errors[:20]:
    print("/".join(str(p) for p in e.absolute_path), ":", e.message)
sys.exit(1 if errors else 0)
"#;

#[test]
fn sarif_output_validates_against_the_2_1_0_schema() {
    let schema = Path::new(env!("CARGO_MANIFEST_DIR")).join("data/sarif/sarif-schema-2.1.0.json");
    assert!(schema.exists(), "{} missing", schema.display());
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("repo");
    std::fs::create_dir_all(&root).unwrap();
    for (_, path, text, _) in planted() {
        let p = root.join(path);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        let mut old = std::fs::read_to_string(&p).unwrap_or_default();
        old.push_str(&text);
        std::fs::write(&p, old).unwrap();
    }
    // A history-only finding carries commit properties.
    git(&root, &["init", "-q", "-b", "main"]);
    std::fs::write(
        root.join("old.sh"),
        format!("export GH=ghp_{}\n", rnd(AN, 36, 98)),
    )
    .unwrap();
    git(&root, &["add", "-A"]);
    git(&root, &["commit", "-qm", "add"]);
    git(&root, &["rm", "-q", "old.sh"]);
    git(&root, &["commit", "-qm", "remove"]);
    let py = python_with_jsonschema();
    let validate = |doc: &str, what: &str| {
        let f = tmp.path().join(format!("{what}.sarif"));
        std::fs::write(&f, doc).unwrap();
        let o = Command::new(&py)
            .args(["-c", VALIDATE_PY])
            .arg(&schema)
            .arg(&f)
            .output()
            .unwrap();
        assert!(
            o.status.success(),
            "{what}: SARIF does not validate:\n{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
    };
    let out = scan(&["--sarif", "--git", root.to_str().unwrap()]);
    assert_eq!(out.code, 1, "{}", out.stderr);
    let v: Value = serde_json::from_str(&out.stdout).unwrap();
    assert!(v["runs"][0]["results"].as_array().unwrap().len() >= 15);
    assert!(out.stdout.contains("\"commit\""));
    validate(&out.stdout, "findings");
    // The validator does reject a broken document.
    let mut broken = v.clone();
    broken["runs"][0]["results"][0]["locations"][0]["physicalLocation"]["region"]["startLine"] =
        serde_json::json!(0);
    let f = tmp.path().join("broken.sarif");
    std::fs::write(&f, broken.to_string()).unwrap();
    let o = Command::new(&py)
        .args(["-c", VALIDATE_PY])
        .arg(&schema)
        .arg(&f)
        .output()
        .unwrap();
    assert!(!o.status.success(), "startLine 0 was accepted");
    // A clean run.
    let clean = tmp.path().join("clean");
    std::fs::create_dir_all(&clean).unwrap();
    std::fs::write(clean.join("a.txt"), "hello\n").unwrap();
    let out = scan(&["--sarif", clean.to_str().unwrap()]);
    assert_eq!(out.code, 0);
    validate(&out.stdout, "clean");
}

// ---- progress line -------------------------------------------------------------

#[test]
fn progress_line_only_on_a_terminal() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("big");
    // A tree big enough that the scan is still running when the line is drawn.
    for d in 0..40 {
        let dir = root.join(format!("d{d}"));
        std::fs::create_dir_all(&dir).unwrap();
        for f in 0..50 {
            let line = format!("let value_{d}_{f} = compute(input, {f});\n");
            std::fs::write(dir.join(format!("f{f}.rs")), line.repeat(300)).unwrap();
        }
    }
    let r = root.to_str().unwrap();
    // Not a terminal: no progress on stderr.
    let out = scan(&["--json", r]);
    assert!(!out.stderr.contains("scanning"), "{}", out.stderr);
    let v: Value = serde_json::from_str(&out.stdout).unwrap();
    assert_eq!(v["stats"]["files_scanned"], 2000);
    // On a terminal (script(1) gives the command a pty): the progress line.
    if Command::new("script").arg("--version").output().is_err() {
        eprintln!("skipping the terminal half: script(1) not installed (util-linux)");
        return;
    }
    let cmd = format!("{} scan --json {r} 2>&1 >/dev/null", warden_bin().display());
    let o = Command::new("script")
        .args(["-qec", &cmd, "/dev/null"])
        .output()
        .unwrap();
    let tty = String::from_utf8_lossy(&o.stdout);
    assert!(
        tty.contains("scanning"),
        "no progress line on a terminal: {tty:?}"
    );
    assert!(tty.contains("files"), "{tty:?}");
    // The JSON on stdout stays clean even on a terminal.
    let cmd = format!("{} scan --json {r} 2>/dev/null", warden_bin().display());
    let o = Command::new("script")
        .args(["-qec", &cmd, "/dev/null"])
        .output()
        .unwrap();
    let tty = String::from_utf8_lossy(&o.stdout);
    assert!(!tty.contains("scanning ["), "{tty:?}");
    let v: Value = serde_json::from_str(tty.trim()).unwrap();
    assert_eq!(v["stats"]["files_scanned"], 2000);
    // --git: a second progress line for the history's blobs.
    git(&root, &["init", "-q", "-b", "main"]);
    git(&root, &["add", "-A"]);
    git(&root, &["commit", "-qm", "all"]);
    let cmd = format!(
        "{} scan --json --git {r} 2>&1 >/dev/null",
        warden_bin().display()
    );
    let o = Command::new("script")
        .args(["-qec", &cmd, "/dev/null"])
        .output()
        .unwrap();
    let tty = String::from_utf8_lossy(&o.stdout);
    assert!(
        tty.contains("git blobs"),
        "no history progress line: {tty:?}"
    );
}

// ---- warden import ---------------------------------------------------------------

/// Runs `warden --config <inst> ARGS` in `dir`.
fn run_in(inst: &warden_tests::Instance, dir: &Path, args: &[&str]) -> warden_tests::Output {
    let o = inst
        .command(args)
        .current_dir(dir)
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    warden_tests::Output {
        code: o.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&o.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
    }
}

fn assert_absent(what: &str, haystack: &str, secrets: &[&str]) {
    for s in secrets {
        assert!(!haystack.contains(s), "a secret value appears in {what}");
    }
}

fn workload_config() -> String {
    format!(
        "trust_domain = \"example.org\"\n\n[[workload]]\nname = \"me\"\nspiffe_id = \"spiffe://example.org/me\"\nselectors = {{ uid = {} }}\n",
        warden_tests::my_uid()
    )
}

#[test]
fn import_dry_run_then_apply_rewrite_audit_and_a_clean_rescan() {
    let inst = warden_tests::Instance::new_with(&workload_config());
    inst.run(&["init"]).ok();
    let work = inst.dir.path().join("work");
    let app = work.join("app");
    std::fs::create_dir_all(app.join("config")).unwrap();
    let pg_pw = format!("{}%2F", rnd(AN, 14, 200)); // percent-encoded '/'
    let pg_pw_decoded = pg_pw.replace("%2F", "/");
    let redis_pw = rnd(AN, 18, 201);
    let gh = format!("ghp_{}", rnd(AN, 36, 202));
    let kept = format!("xoxb-1234567890-1234567890123-{}", rnd(AN, 24, 203));
    let env_text = format!(
        "# app settings\nDATABASE_URL=postgres://app:{pg_pw}@db.internal:5432/orders?sslmode=verify-full&application_name=web\nREDIS_URL=redis://:{redis_pw}@127.0.0.1:6379/0\nGITHUB_TOKEN={gh}\n"
    );
    std::fs::write(app.join(".env"), &env_text).unwrap();
    // The same database URL again in another file: one secret, one route.
    let yml_text = format!("db:\n  url: \"postgres://app:{pg_pw}@db.internal:5432/orders\"\n");
    std::fs::write(app.join("config/db.yml"), &yml_text).unwrap();
    // Outside the selection: kept in place by the operator's choice.
    std::fs::write(work.join("bot.env"), format!("SLACK_BOT_TOKEN={kept}\n")).unwrap();
    let secrets = [
        pg_pw.as_str(),
        pg_pw_decoded.as_str(),
        redis_pw.as_str(),
        gh.as_str(),
        kept.as_str(),
    ];

    // Scan from `work` with relative paths, as an operator would.
    let out = run_in(&inst, &work, &["scan", "--json", "."]);
    assert_eq!(out.code, 1, "{out:#?}");
    std::fs::write(work.join("report.json"), &out.stdout).unwrap();
    let fragment = work.join("warden-import.toml");

    // Dry run (the default): the plan, the would-be fragment and diff; nothing changes.
    let out = run_in(
        &inst,
        &work,
        &[
            "import",
            "--from",
            "report.json",
            "--path",
            "app",
            "--rewrite",
            "--allow",
            "me",
        ],
    );
    out.ok()
        .stdout_has("dry run")
        .stdout_has("[[route]]")
        .stdout_has("--- ./app/.env");
    assert_absent(
        "dry-run output",
        &(out.stdout.clone() + &out.stderr),
        &secrets,
    );
    assert_eq!(std::fs::read_to_string(app.join(".env")).unwrap(), env_text);
    assert!(!fragment.exists());
    assert!(!app.join(".env.warden-bak").exists());
    let list = inst.run(&["secret", "list"]);
    list.ok().stdout_has("no secrets");

    // Apply, selecting the app directory only.
    let out = run_in(
        &inst,
        &work,
        &[
            "import",
            "--from",
            "report.json",
            "--path",
            "app",
            "--apply",
            "--rewrite",
            "--allow",
            "me",
            "--listen-port",
            "25432",
        ],
    );
    out.ok();
    assert_absent(
        "import output",
        &(out.stdout.clone() + &out.stderr),
        &secrets,
    );
    assert!(
        out.stdout.contains("-DATABASE_URL=postgres://app:"),
        "{}",
        out.stdout
    );
    assert!(
        out.stdout
            .contains("+DATABASE_URL=postgres://app@127.0.0.1:25432/orders?application_name=web"),
        "{}",
        out.stdout
    );
    // Fragment: a secret per value, a route per database URL; no values.
    let frag = std::fs::read_to_string(&fragment).unwrap();
    assert_absent("the fragment", &frag, &secrets);
    assert_eq!(frag.matches("[[secret]]").count(), 3, "{frag}");
    assert_eq!(frag.matches("[[route]]").count(), 2, "{frag}");
    assert!(frag.contains("kind = \"postgres\""), "{frag}");
    assert!(frag.contains("upstream = \"db.internal:5432\""), "{frag}");
    assert!(
        frag.contains("upstream_tls = { mode = \"verify-full\" }"),
        "{frag}"
    );
    assert!(
        frag.contains(
            "credential = { user = \"app\", secret = \"imported/db.internal-5432/app\" }"
        ),
        "{frag}"
    );
    assert!(frag.contains("kind = \"redis\""), "{frag}");
    assert!(frag.contains("listen = \"127.0.0.1:25433\""), "{frag}");
    assert!(frag.contains("allow = [\"me\"]"), "{frag}");
    // The fragment is a valid configuration once merged.
    let merged = inst.dir.path().join("merged.toml");
    std::fs::write(
        &merged,
        std::fs::read_to_string(&inst.config).unwrap() + "\n" + &frag,
    )
    .unwrap();
    let check = inst.run(&["config", "check", merged.to_str().unwrap()]);
    assert_eq!(check.code, 0, "{check:#?}\n{frag}");
    // Stored values: the decoded URL password, the others as written.
    for (name, want) in [
        ("imported/db.internal-5432/app", pg_pw_decoded.as_str()),
        ("imported/127.0.0.1-6379/default", redis_pw.as_str()),
    ] {
        let got = inst.run(&["secret", "get", name, "--reveal"]);
        assert_eq!(got.ok().stdout, want, "{name}");
    }
    let list = inst.run(&["secret", "list", "--json"]);
    let names: Vec<String> = serde_json::from_str::<Value>(&list.stdout)
        .unwrap()
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].as_str().unwrap().to_string())
        .collect();
    let gh_name = names
        .iter()
        .find(|n| n.contains("github"))
        .expect("github secret")
        .clone();
    assert_eq!(
        inst.run(&["secret", "get", &gh_name, "--reveal"]).stdout,
        gh
    );
    // Rewritten files, backups, references.
    let env_now = std::fs::read_to_string(app.join(".env")).unwrap();
    assert_absent("the rewritten .env", &env_now, &secrets);
    assert!(
        env_now.contains("REDIS_URL=redis://127.0.0.1:25433/0\n"),
        "{env_now}"
    );
    assert!(
        env_now.contains(&format!("GITHUB_TOKEN=warden:secret/{gh_name}\n")),
        "{env_now}"
    );
    assert!(env_now.starts_with("# app settings\n"));
    assert_eq!(
        std::fs::read_to_string(app.join(".env.warden-bak")).unwrap(),
        env_text
    );
    let yml_now = std::fs::read_to_string(app.join("config/db.yml")).unwrap();
    assert_eq!(
        yml_now,
        "db:\n  url: \"postgres://app@127.0.0.1:25432/orders\"\n"
    );
    // Audit: a secret.import record per value naming files and rules, no value.
    let audit = std::fs::read_to_string(inst.audit_log()).unwrap();
    assert_absent("the audit log", &audit, &secrets);
    let imports: Vec<Value> = audit
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|r| r["action"] == "secret.import")
        .collect();
    assert_eq!(imports.len(), 3, "{audit}");
    let pg_rec = imports
        .iter()
        .find(|r| r["target"]["secret"] == "imported/db.internal-5432/app")
        .unwrap();
    let reason = pg_rec["reason"].as_str().unwrap();
    assert!(
        reason.contains("./app/.env:2 (database-url-password)"),
        "{reason}"
    );
    assert!(
        reason.contains("./app/config/db.yml:2 (database-url-password)"),
        "{reason}"
    );
    let v = inst.run(&["audit", "verify"]);
    v.ok();

    // Rescan: only what the operator kept (the backups hold the old values:
    // the operator deletes them; here they are moved out of the tree first).
    for b in [
        app.join(".env.warden-bak"),
        app.join("config/db.yml.warden-bak"),
    ] {
        std::fs::rename(&b, inst.dir.path().join(b.file_name().unwrap())).unwrap();
    }
    let out = run_in(&inst, &work, &["scan", "--json", "app", "bot.env"]);
    assert_eq!(out.code, 1, "{out:#?}");
    let v: Value = serde_json::from_str(&out.stdout).unwrap();
    let left: Vec<(&str, &str)> = v["findings"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| (f["path"].as_str().unwrap(), f["rule_id"].as_str().unwrap()))
        .collect();
    assert_eq!(left, vec![("bot.env", "slack-bot-token")], "{left:?}");
    let out = run_in(&inst, &work, &["scan", "app"]);
    assert_eq!(out.code, 0, "the rewritten tree is clean: {out:#?}");
    // A second apply refuses to overwrite the fragment.
    let out = run_in(&inst, &work, &["import", ".", "--apply"]);
    out.code(2).stderr_has("exists");
}

#[test]
fn import_refuses_changed_files_and_explains_bad_input() {
    let inst = warden_tests::Instance::new_with(&workload_config());
    inst.run(&["init"]).ok();
    let work = inst.dir.path().join("work");
    std::fs::create_dir_all(&work).unwrap();
    let gh = format!("ghp_{}", rnd(AN, 36, 210));
    std::fs::write(work.join("ci.sh"), format!("export GH={gh}\n")).unwrap();
    let out = run_in(&inst, &work, &["scan", "--json", "."]);
    std::fs::write(work.join("report.json"), &out.stdout).unwrap();
    // The file changed since the scan: another token at the same place.
    let other = format!("ghp_{}", rnd(AN, 36, 211));
    std::fs::write(work.join("ci.sh"), format!("export GH={other}\n")).unwrap();
    let out = run_in(
        &inst,
        &work,
        &["import", "--from", "report.json", "--apply"],
    );
    out.code(2)
        .stderr_has("changed since the scan")
        .stderr_has("./ci.sh:1")
        .stderr_has("no longer matches the scan's fingerprint");
    assert_absent(
        "the refusal",
        &(out.stdout.clone() + &out.stderr),
        &[&gh, &other],
    );
    inst.run(&["secret", "list"]).ok().stdout_has("no secrets");
    // Moved down a line.
    std::fs::write(work.join("ci.sh"), format!("#!/bin/sh\nexport GH={gh}\n")).unwrap();
    run_in(&inst, &work, &["import", "--from", "report.json"])
        .code(2)
        .stderr_has("any more");
    // Bad input: each names the problem and the fix.
    run_in(&inst, &work, &["import"])
        .code(2)
        .stderr_has("either --from REPORT");
    run_in(&inst, &work, &["import", "--from", "report.json", "."])
        .code(2)
        .stderr_has("either --from REPORT");
    let sarif = run_in(&inst, &work, &["scan", "--sarif", "."]);
    std::fs::write(work.join("r.sarif"), &sarif.stdout).unwrap();
    run_in(&inst, &work, &["import", "--from", "r.sarif"])
        .code(2)
        .stderr_has("a SARIF report")
        .stderr_has("warden scan --json");
    std::fs::write(work.join("junk.json"), "not json").unwrap();
    run_in(&inst, &work, &["import", "--from", "junk.json"])
        .code(2)
        .stderr_has("not JSON");
    run_in(&inst, &work, &["import", ".", "--rule", "no-such-rule"])
        .code(2)
        .stderr_has("no such rule");
    run_in(&inst, &work, &["import", ".", "--prefix", "Bad Prefix"])
        .code(2)
        .stderr_has("--prefix");
    run_in(&inst, &work, &["import", ".", "--listen-host", "10.0.0.1"])
        .code(2)
        .stderr_has("loopback");
    // A history-only finding is listed as skipped, with the reason.
    git(&work, &["init", "-q", "-b", "main"]);
    std::fs::write(work.join("old.sh"), format!("T=ghp_{}\n", rnd(AN, 36, 212))).unwrap();
    git(&work, &["add", "old.sh"]);
    git(&work, &["commit", "-qm", "a"]);
    git(&work, &["rm", "-q", "old.sh"]);
    git(&work, &["commit", "-qm", "b"]);
    let out = run_in(&inst, &work, &["scan", "--json", "--git", "."]);
    std::fs::write(work.join("h.json"), &out.stdout).unwrap();
    run_in(
        &inst,
        &work,
        &["import", "--from", "h.json", "--path", "old.sh"],
    )
    .ok()
    .stdout_has("only in git history");
}

// ---- end to end: an app rewired through warden to PostgreSQL ----------------------

#[test]
fn import_rewires_an_app_through_warden_to_a_real_postgres() {
    use warden_tests::pg::{psql_available, run_psql, Auth, ClusterOptions, PgCluster};
    if !psql_available() {
        eprintln!("skipping: PostgreSQL (psql, initdb) not available");
        return;
    }
    let pg = PgCluster::start(ClusterOptions::new(Auth::Scram));
    let pw = rnd(AN, 16, 300);
    pg.create_role("app", &pw);
    pg.psql_admin_in(
        "app",
        "CREATE TABLE orders (id int); INSERT INTO orders VALUES (42); GRANT SELECT ON orders TO app;",
    );
    let inst = warden_tests::Instance::new_with(&workload_config());
    inst.run(&["init"]).ok();
    // The import goes through the running daemon's admin API.
    let mut daemon = inst.start_daemon();

    let tree = inst.dir.path().join("shop");
    std::fs::create_dir_all(tree.join("src")).unwrap();
    let settings = tree.join("src/settings.py");
    let dsn = format!("postgres://app:{pw}@127.0.0.1:{}/app", pg.port);
    std::fs::write(
        &settings,
        format!("import os\n\nDATABASE_URL = os.environ.get(\"DATABASE_URL\", \"{dsn}\")\n"),
    )
    .unwrap();
    let app_url = |path: &Path| -> String {
        let text = std::fs::read_to_string(path).unwrap();
        let start = text.find("postgres://").unwrap();
        let end = start + text[start..].find('"').unwrap();
        text[start..end].to_string()
    };
    // The app as it was: straight to the server with its hard-coded password.
    let o = run_psql(&app_url(&settings), "SELECT id FROM orders");
    assert_eq!(o.stdout.trim(), "42", "{o:#?}");

    let out = scan(&["--json", tree.to_str().unwrap()]);
    assert_eq!(out.code, 1, "{}", out.stderr);
    let report = inst.dir.path().join("report.json");
    std::fs::write(&report, &out.stdout).unwrap();
    let fragment = inst.dir.path().join("fragment.toml");
    let listen = warden_tests::free_port().to_string();
    let out = inst.run(&[
        "import",
        "--from",
        report.to_str().unwrap(),
        "--apply",
        "--rewrite",
        "--allow",
        "me",
        "--listen-port",
        &listen,
        "--fragment",
        fragment.to_str().unwrap(),
    ]);
    out.ok().stdout_has("stored imported/127.0.0.1-");
    assert_absent("import output", &(out.stdout.clone() + &out.stderr), &[&pw]);
    let frag = std::fs::read_to_string(&fragment).unwrap();
    assert_absent("the fragment", &frag, &[&pw]);
    assert!(
        frag.contains("upstream_tls = { mode = \"disable\" }"),
        "{frag}"
    );

    // Merge the fragment, restart the daemon with the new route.
    daemon.stop();
    let cfg = std::fs::read_to_string(&inst.config).unwrap();
    std::fs::write(&inst.config, format!("{cfg}\n{frag}")).unwrap();
    let daemon = inst.start_daemon();

    // The app's own connection string now goes through warden.
    let url = app_url(&settings);
    assert_eq!(url, format!("postgres://app@127.0.0.1:{listen}/app"));
    let o = run_psql(&url, "SELECT id FROM orders");
    assert_eq!(o.stdout.trim(), "42", "{o:#?}\n{}", daemon.log_text());
    // Warden logged in for it (a session on the imported route).
    let audit = std::fs::read_to_string(inst.audit_log()).unwrap();
    assert!(audit.contains("\"secret.import\""), "{audit}");
    assert!(audit.contains("session.start"), "{audit}");
    assert_absent("the audit log", &audit, &[&pw]);
    assert_absent("the daemon log", &daemon.log_text(), &[&pw]);

    // No password left in the tree but the backup; without it the rescan is clean.
    let holders = warden_tests::files_containing(&tree, pw.as_bytes());
    assert_eq!(holders, vec![tree.join("src/settings.py.warden-bak")]);
    std::fs::remove_file(tree.join("src/settings.py.warden-bak")).unwrap();
    assert!(warden_tests::files_containing(&tree, pw.as_bytes()).is_empty());
    let out = scan(&[tree.to_str().unwrap()]);
    assert_eq!(out.code, 0, "rescan not clean: {}", out.stdout);
}

// ---- --verify --------------------------------------------------------------------------

#[test]
fn verify_says_live_rejected_or_unreachable_only_when_asked() {
    use std::net::TcpListener;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    use warden_tests::pg::{psql_available, Auth, ClusterOptions, PgCluster};
    if !psql_available() {
        eprintln!("skipping: PostgreSQL (psql, initdb) not available");
        return;
    }
    let pg = PgCluster::start(ClusterOptions::new(Auth::Scram));
    let pw = rnd(AN, 16, 310);
    let wrong = rnd(AN, 16, 311);
    pg.create_role("app", &pw);
    let redis_default = rnd(AN, 16, 312);
    let redis = warden_tests::redis::RedisServer::start(&redis_default, &rnd(AN, 16, 313));
    // A listener of our own that counts connections: nothing may reach it
    // unless --verify is given.
    let trap = TcpListener::bind("127.0.0.1:0").unwrap();
    let trap_port = trap.local_addr().unwrap().port();
    let hits = Arc::new(AtomicUsize::new(0));
    {
        let hits = hits.clone();
        std::thread::spawn(move || {
            for c in trap.incoming() {
                hits.fetch_add(1, Ordering::SeqCst);
                drop(c);
            }
        });
    }
    let closed = warden_tests::free_port();
    let tmp = tempfile::tempdir().unwrap();
    let p = pg.port;
    let rp = redis.port;
    let redis_wrong = rnd(AN, 16, 314);
    let trap_pw = rnd(AN, 16, 315);
    std::fs::write(
        tmp.path().join("db.env"),
        format!(
            "LIVE=postgres://app:{pw}@127.0.0.1:{p}/app?sslmode=disable\n\
             WRONG=postgres://app:{wrong}@127.0.0.1:{p}/app\n\
             DOWN=postgres://app:{pw}@127.0.0.1:{closed}/app\n\
             NODB=postgres://app:{pw}@127.0.0.1:{p}/nosuchdb\n\
             TRAP=postgres://app:{trap_pw}@127.0.0.1:{trap_port}/app\n\
             CACHE=redis://:{redis_default}@127.0.0.1:{rp}/0\n\
             CACHE2=redis://:{redis_wrong}@127.0.0.1:{rp}/0\n\
             CACHE3=rediss://:{redis_default}@127.0.0.1:{rp}/0\n"
        ),
    )
    .unwrap();
    let d = tmp.path().to_str().unwrap();
    let secrets = [
        pw.as_str(),
        wrong.as_str(),
        redis_default.as_str(),
        redis_wrong.as_str(),
        trap_pw.as_str(),
    ];
    let out = scan(&["--json", d]);
    assert_eq!(out.code, 1);
    assert!(
        !out.stdout.contains("verified"),
        "verified without --verify"
    );
    std::thread::sleep(std::time::Duration::from_millis(200));
    assert_eq!(
        hits.load(Ordering::SeqCst),
        0,
        "a scan without --verify connected"
    );

    let out = scan(&["--json", "--verify", d]);
    assert_eq!(out.code, 1, "{}", out.stderr);
    assert_absent(
        "--verify output",
        &(out.stdout.clone() + &out.stderr),
        &secrets,
    );
    let v: Value = serde_json::from_str(&out.stdout).unwrap();
    let by_line: std::collections::BTreeMap<u64, String> = v["findings"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| {
            (
                f["line"].as_u64().unwrap(),
                f["verified"].as_str().unwrap_or("-").to_string(),
            )
        })
        .collect();
    let at = |l: u64| by_line.get(&l).cloned().unwrap_or_default();
    assert!(at(1).starts_with("live"), "{by_line:#?}");
    assert!(at(2).starts_with("rejected"), "{by_line:#?}");
    assert!(at(3).starts_with("unreachable"), "{by_line:#?}");
    assert!(
        at(4).starts_with("live") && at(4).contains("does not exist"),
        "{by_line:#?}"
    );
    assert!(at(5).starts_with("unreachable"), "{by_line:#?}");
    assert!(at(6).starts_with("live"), "{by_line:#?}");
    assert!(at(7).starts_with("rejected"), "{by_line:#?}");
    // rediss:// to a server without TLS: the handshake fails, nothing sent.
    assert!(at(8).starts_with("unreachable"), "{by_line:#?}");
    assert!(
        hits.load(Ordering::SeqCst) >= 1,
        "--verify did not try the URL's own host"
    );
    // The text report shows it too.
    let out = scan(&["--verify", d]);
    assert!(
        out.stdout
            .contains("verify: live (login accepted by 127.0.0.1:"),
        "{}",
        out.stdout
    );
    // A URL only in history is tried with the value from its git blob.
    let repo = tmp.path().join("hist");
    std::fs::create_dir_all(&repo).unwrap();
    git(&repo, &["init", "-q", "-b", "main"]);
    std::fs::write(
        repo.join("old.env"),
        format!("DB=postgres://app:{pw}@127.0.0.1:{p}/app\n"),
    )
    .unwrap();
    git(&repo, &["add", "old.env"]);
    git(&repo, &["commit", "-qm", "add"]);
    git(&repo, &["rm", "-q", "old.env"]);
    git(&repo, &["commit", "-qm", "remove"]);
    let out = scan(&["--json", "--git", "--verify", repo.to_str().unwrap()]);
    assert_eq!(out.code, 1, "{}", out.stderr);
    assert_absent(
        "--verify --git output",
        &(out.stdout.clone() + &out.stderr),
        &secrets,
    );
    let v: Value = serde_json::from_str(&out.stdout).unwrap();
    let f = &v["findings"][0];
    assert!(f["commit"].is_string(), "{v:#}");
    assert!(f["verified"].as_str().unwrap().starts_with("live"), "{v:#}");
}

#[test]
fn respect_gitignore_is_opt_in() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("repo");
    std::fs::create_dir_all(&root).unwrap();
    let tok = format!("ghp_{}", rnd(AN, 36, 400));
    std::fs::write(root.join(".gitignore"), "local.env\n").unwrap();
    std::fs::write(root.join("local.env"), format!("GH={tok}\n")).unwrap();
    std::fs::write(root.join("app.py"), "print('hi')\n").unwrap();
    let r = root.to_str().unwrap();
    // Not a git work tree yet: the option is refused with the reason.
    let out = scan(&["--respect-gitignore", r]);
    assert_eq!(out.code, 2, "{}", out.stderr);
    assert!(
        out.stderr.contains("not inside a git work tree"),
        "{}",
        out.stderr
    );
    git(&root, &["init", "-q", "-b", "main"]);
    // Default: ignored files are scanned (that is where secrets sit).
    let out = scan(&["--json", r]);
    assert_eq!(out.code, 1);
    assert!(out.stdout.contains("local.env"));
    // Opt-in: left out and counted.
    let out = scan(&["--json", "--respect-gitignore", r]);
    assert_eq!(out.code, 0, "{}", out.stdout);
    let v: Value = serde_json::from_str(&out.stdout).unwrap();
    assert_eq!(v["stats"]["skipped_gitignored"], 1);
    let out = scan(&["--respect-gitignore", r]);
    assert!(
        out.stdout.contains("1 file(s) ignored by git"),
        "{}",
        out.stdout
    );
}

#[test]
fn import_rewires_a_redis_url_through_warden() {
    use warden_tests::redis::RedisServer;
    let pw = rnd(AN, 20, 500);
    let redis = RedisServer::start(&pw, &rnd(AN, 20, 501));
    let inst = warden_tests::Instance::new_with(&workload_config());
    inst.run(&["init"]).ok();
    let tree = inst.dir.path().join("worker");
    std::fs::create_dir_all(&tree).unwrap();
    let env = tree.join(".env");
    std::fs::write(
        &env,
        format!("QUEUE_URL=redis://:{pw}@127.0.0.1:{}/0\n", redis.port),
    )
    .unwrap();
    let fragment = inst.dir.path().join("fragment.toml");
    let listen = warden_tests::free_port().to_string();
    // Import straight from a rescan of the tree, offline (no daemon yet).
    let out = inst.run(&[
        "import",
        tree.to_str().unwrap(),
        "--apply",
        "--rewrite",
        "--allow",
        "me",
        "--listen-port",
        &listen,
        "--fragment",
        fragment.to_str().unwrap(),
    ]);
    out.ok();
    assert_absent("import output", &(out.stdout.clone() + &out.stderr), &[&pw]);
    let frag = std::fs::read_to_string(&fragment).unwrap();
    assert!(frag.contains("kind = \"redis\""), "{frag}");
    assert!(
        frag.contains("credential = { secret = \"imported/127.0.0.1-"),
        "{frag}"
    );
    let cfg = std::fs::read_to_string(&inst.config).unwrap();
    std::fs::write(&inst.config, format!("{cfg}\n{frag}")).unwrap();
    let daemon = inst.start_daemon();
    let text = std::fs::read_to_string(&env).unwrap();
    assert_eq!(text, format!("QUEUE_URL=redis://127.0.0.1:{listen}/0\n"));
    // The worker's URL, with no password, reaches the real server through warden.
    let url = text.trim().trim_start_matches("QUEUE_URL=");
    let out = Command::new("redis-cli")
        .args(["-u", url, "SET", "k", "v"])
        .env_remove("REDISCLI_AUTH")
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&out.stdout);
    assert_eq!(said.trim(), "OK", "{said} {}", daemon.log_text());
    let (_, got) =
        warden_tests::redis::cli(redis.port, &["-a", &pw, "--no-auth-warning", "GET", "k"]);
    assert_eq!(got.trim(), "v");
    std::fs::remove_file(tree.join(".env.warden-bak")).unwrap();
    assert_eq!(scan(&[tree.to_str().unwrap()]).code, 0);
}
