//! `warden import`: move what `warden scan` found into warden. Reads a
//! scan's JSON report (or scans PATHs now), selects findings (all, by rule,
//! by path), finds each value again in its file — checked against the
//! report's fingerprint, so a file that changed since the scan is refused —
//! and, with `--apply`, stores it with `secret put` semantics (admin API of
//! the running daemon, else the data dir; one `secret.import` audit record
//! per value naming files, lines and rules), writes a config fragment (a
//! `[[secret]]` per value, a `[[route]]` per PostgreSQL or Redis URL) and,
//! with `--rewrite`, replaces each finding in its file (a database URL by the
//! password-free URL of the route's listener, anything else by a
//! `warden:secret/NAME` reference), keeping a `.warden-bak` copy and printing
//! a diff. Without `--apply` it is a dry run that changes nothing.
//!
//! Values are read into `Zeroizing` buffers, go to the store base64-encoded
//! in a `Zeroizing` request, and are never printed: the plan and the diff
//! show the scan's redacted form.

use crate::cli::{Context, Target};
use crate::dburl::{percent_decode_bytes, DbKind, DbUrl};
use crate::scan;
use base64::Engine;
use clap::Args;
use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::io::Write as _;
use std::ops::Range;
use std::path::{Path, PathBuf};
use warden_core::error::{Error, Result};
use warden_scan::allow::Glob;
use warden_scan::{Finding, Located, Scanner};
use zeroize::Zeroizing;

/// Suffix of the copy `--rewrite` keeps of each file it edits.
pub const BACKUP_SUFFIX: &str = ".warden-bak";
/// What a rewritten non-URL finding becomes.
pub const REFERENCE_PREFIX: &str = "warden:secret/";

#[derive(Args)]
pub struct ImportArgs {
    /// Scan these files and directories now (instead of --from).
    #[arg(value_name = "PATH")]
    paths: Vec<PathBuf>,
    /// A `warden scan --json` report. Its paths are relative to where that
    /// scan ran: run import from the same directory.
    #[arg(long, value_name = "REPORT")]
    from: Option<PathBuf>,
    /// Only findings of this rule id (repeatable).
    #[arg(long = "rule", value_name = "ID")]
    rule: Vec<String>,
    /// Only findings in this file, under this directory, or matching this
    /// glob (`*`, `**`; repeatable).
    #[arg(long = "path", value_name = "PATH|GLOB")]
    path: Vec<String>,
    /// Act: store the values and write the fragment. Without it, a dry run
    /// that shows the plan and changes nothing.
    #[arg(long)]
    apply: bool,
    /// Also replace each finding in its file (a copy is kept as
    /// FILE.warden-bak) and print the diff (dry run: the diff it would make).
    #[arg(long)]
    rewrite: bool,
    /// Where the configuration fragment is written (never overwritten).
    #[arg(long, value_name = "FILE", default_value = "warden-import.toml")]
    fragment: PathBuf,
    /// Secret names start with this.
    #[arg(long, value_name = "PREFIX", default_value = "imported")]
    prefix: String,
    /// Environment to store the secrets in (default: the config's `environment`).
    #[arg(long)]
    env: Option<String>,
    /// Workload allowed on the generated routes (repeatable; default: none, fill `allow` in).
    #[arg(long = "allow", value_name = "WORKLOAD")]
    allow: Vec<String>,
    /// Local port of the first generated route's listener; the next routes take the following ports.
    #[arg(long, value_name = "PORT", default_value_t = 15432)]
    listen_port: u16,
    /// Address the generated listeners bind (loopback).
    #[arg(long, value_name = "IP", default_value = "127.0.0.1")]
    listen_host: std::net::IpAddr,
    /// Extra rules, as given to `warden scan --rules` (needed to find their findings again).
    #[arg(long, value_name = "FILE")]
    rules: Option<PathBuf>,
}

/// One selected finding, found again in its file.
struct Item {
    finding: Finding,
    located: Located,
    /// Index into `Plan::secrets`.
    secret: usize,
    /// For a routable database URL: index into `Plan::routes`.
    route: Option<usize>,
    /// This finding's own URL (its database and parameters may differ from
    /// the route's first URL).
    url: Option<DbUrl>,
}

struct SecretPlan {
    name: String,
    value: Zeroizing<Vec<u8>>,
    /// `path:line (rule)` of every finding holding this value.
    origins: Vec<String>,
}

struct RoutePlan {
    name: String,
    url: DbUrl,
    listen: String,
    secret: usize,
}

struct Plan {
    items: Vec<Item>,
    secrets: Vec<SecretPlan>,
    routes: Vec<RoutePlan>,
    /// Files read, by the path the report uses.
    texts: BTreeMap<String, String>,
    /// Findings not imported, with why.
    skipped: Vec<(Finding, String)>,
}

pub fn run(ctx: &Context, args: ImportArgs) -> Result<()> {
    // Exactly one of the two: both given, or neither, is a usage error.
    if args.from.is_some() != args.paths.is_empty() {
        return Err(Error::usage(
            "give either --from REPORT (a `warden scan --json` report) or the PATHs to scan now, not both and not neither",
        ));
    }
    if args.listen_port == 0 {
        return Err(Error::usage("--listen-port must be between 1 and 65535"));
    }
    if !args.listen_host.is_loopback() {
        return Err(Error::usage(format!(
            "--listen-host {}: route listeners are loopback addresses (127.0.0.1 or ::1)",
            args.listen_host
        )));
    }
    if let Some(env) = &args.env {
        warden_core::store::validate_env(env)?;
    }
    check_prefix(&args.prefix)?;
    let scanner = scan::build_scanner(args.rules.as_deref())?;
    let findings = match &args.from {
        Some(report) => read_report(report)?,
        None => {
            warden_scan::scan_paths(&scanner, &args.paths)
                .map_err(|e| Error::usage(e.to_string()))?
                .findings
        }
    };
    let globs: Vec<(String, Glob)> = args
        .path
        .iter()
        .map(|p| {
            Glob::new(p)
                .map(|g| (p.trim_end_matches('/').to_string(), g))
                .map_err(|e| Error::usage(format!("--path {p:?}: {e}")))
        })
        .collect::<Result<_>>()?;
    for r in &args.rule {
        if !scanner.rules.rules.iter().any(|x| &x.id == r) {
            return Err(Error::usage(format!(
                "--rule {r:?}: no such rule (rule ids are in the report's \"rule_id\" fields and in docs/scan.md)"
            )));
        }
    }
    let selected: Vec<Finding> = findings
        .into_iter()
        .filter(|f| args.rule.is_empty() || args.rule.contains(&f.rule_id))
        .filter(|f| globs.is_empty() || globs.iter().any(|(p, g)| path_matches(&f.path, p, g)))
        .collect();
    let plan = build_plan(&scanner, &args, selected)?;
    let out = render_plan(&args, &plan);
    print!("{out}");
    if plan.items.is_empty() {
        println!("nothing to import");
        return Ok(());
    }
    let fragment = fragment_text(&args, &plan);
    let rewrites = if args.rewrite {
        rewrite_files(&plan)?
    } else {
        Vec::new()
    };
    if !args.apply {
        println!(
            "\n# configuration fragment ({} when applied):\n{fragment}",
            args.fragment.display()
        );
        for r in &rewrites {
            print!("{}", r.diff);
        }
        println!("\ndry run: nothing stored, no file written; run again with --apply to import");
        return Ok(());
    }
    // Refuse before storing anything if an output cannot be written.
    if args.fragment.exists() {
        return Err(Error::usage(format!(
            "the fragment file {} exists: choose another --fragment or move it away (import never overwrites it)",
            args.fragment.display()
        )));
    }
    for r in &rewrites {
        let backup = backup_path(&r.path);
        if backup.exists() {
            return Err(Error::usage(format!(
                "the backup {} exists (from an earlier import?): move it away before rewriting {}",
                backup.display(),
                r.path.display()
            )));
        }
    }
    let mut target = Target::connect(ctx)?;
    let env_shown = args
        .env
        .clone()
        .unwrap_or_else(|| ctx.cfg.environment.clone());
    for s in &plan.secrets {
        let value_b64 = Zeroizing::new(base64::engine::general_purpose::STANDARD.encode(&*s.value));
        let version: u32 = target
            .call(crate::admin::Request::SecretPut {
                name: s.name.clone(),
                env: args.env.clone(),
                value_b64,
                origin: Some(s.origins.join(", ")),
            })?
            .into_result()?;
        println!("stored {} (env {env_shown}) version {version}", s.name);
    }
    drop(target);
    write_new(&args.fragment, fragment.as_bytes())?;
    println!("wrote {}", args.fragment.display());
    for r in &rewrites {
        let backup = backup_path(&r.path);
        std::fs::copy(&r.path, &backup).map_err(|e| Error::io("cannot back up", &r.path, &e))?;
        replace_file(&r.path, r.new_text.as_bytes())?;
        println!("rewrote {} (backup {})", r.path.display(), backup.display());
        print!("{}", r.diff);
    }
    if !plan.routes.is_empty() || !plan.secrets.is_empty() {
        println!(
            "\nnext: merge {} into the configuration (`warden config check`), restart `warden up`, then rescan: `warden scan PATH`",
            args.fragment.display()
        );
    }
    Ok(())
}

fn check_prefix(prefix: &str) -> Result<()> {
    let ok = !prefix.is_empty()
        && prefix.len() <= 40
        && prefix.starts_with(|c: char| c.is_ascii_lowercase() || c.is_ascii_digit())
        && !prefix.ends_with('/')
        && !prefix.contains("//")
        && prefix
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._/-".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(Error::usage(format!(
            "--prefix {prefix:?}: use lowercase letters, digits and . _ - /, starting with a letter or digit, at most 40 characters, like \"imported\""
        )))
    }
}

fn path_matches(path: &str, sel: &str, glob: &Glob) -> bool {
    let p = path.strip_prefix("./").unwrap_or(path);
    let s = sel.strip_prefix("./").unwrap_or(sel);
    p == s || p.starts_with(&format!("{s}/")) || glob.matches(path)
}

fn read_report(path: &Path) -> Result<Vec<Finding>> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| Error::usage(format!("--from {}: {e}", path.display())))?;
    let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| {
        Error::usage(format!(
            "--from {}: not JSON ({e}); give the output of `warden scan --json PATH`",
            path.display()
        ))
    })?;
    let Some(list) = v.get("findings") else {
        let what = if v.get("runs").is_some() {
            "a SARIF report"
        } else if v.get("fingerprints").is_some() {
            "a baseline"
        } else {
            "not a scan report"
        };
        return Err(Error::usage(format!(
            "--from {}: {what}; import reads the output of `warden scan --json PATH > report.json`",
            path.display()
        )));
    };
    serde_json::from_value(list.clone()).map_err(|e| {
        Error::usage(format!(
            "--from {}: a finding is malformed ({e}); give an unedited `warden scan --json` report",
            path.display()
        ))
    })
}

/// Lowercase, characters outside `[a-z0-9._-]` as `-`, runs collapsed.
fn slug(s: &str, keep_dots: bool) -> String {
    let mut out = String::new();
    for c in s.chars() {
        let c = c.to_ascii_lowercase();
        if c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || (keep_dots && c == '.') {
            out.push(c);
        } else if !out.ends_with('-') {
            out.push('-');
        }
    }
    out.trim_matches(['-', '.', '_']).to_string()
}

fn build_plan(scanner: &Scanner, args: &ImportArgs, selected: Vec<Finding>) -> Result<Plan> {
    let mut plan = Plan {
        items: Vec::new(),
        secrets: Vec::new(),
        routes: Vec::new(),
        texts: BTreeMap::new(),
        skipped: Vec::new(),
    };
    let mut problems = Vec::new();
    let mut routes_by_key: HashMap<(String, u16, String, DbKind), usize> = HashMap::new();
    let mut taken: HashMap<String, usize> = HashMap::new();
    for f in selected {
        if let Some(c) = &f.commit {
            let why = format!(
                "only in git history (commit {c}): not in the tree to import; rotate it where it was issued"
            );
            plan.skipped.push((f, why));
            continue;
        }
        if !plan.texts.contains_key(&f.path) {
            let data = std::fs::read(&f.path).map_err(|e| {
                Error::usage(format!(
                    "{}: {e}; run import from the directory the scan ran in (paths in the report are relative to it)",
                    f.path
                ))
            })?;
            let text = String::from_utf8(data).map_err(|_| {
                Error::usage(format!(
                    "{}: not UTF-8 text; import edits only text files — move this value by hand (`warden secret put`)",
                    f.path
                ))
            })?;
            plan.texts.insert(f.path.clone(), text);
        }
        let text = &plan.texts[&f.path];
        let located = match scanner.locate(text, &f) {
            Ok(l) => l,
            Err(e) => {
                problems.push(format!(
                    "{}:{}: {} [{}]: {e}",
                    f.path, f.line, f.description, f.rule_id
                ));
                continue;
            }
        };
        let raw = &text.as_bytes()[located.value.clone()];
        let whole = trim_url_end(text, located.whole.clone());
        let url = DbUrl::parse(&text[whole.clone()]).filter(|_| is_url_rule(&f.rule_id));
        // URL passwords are percent-encoded; the server knows the decoded one.
        let value = match &url {
            Some(_) => Zeroizing::new(percent_decode_bytes(raw).unwrap_or_else(|| raw.to_vec())),
            None => Zeroizing::new(raw.to_vec()),
        };
        let origin = format!("{}:{} ({})", f.path, f.line, f.rule_id);
        let secret = match plan.secrets.iter().position(|s| s.value == value) {
            Some(i) => {
                plan.secrets[i].origins.push(origin);
                i
            }
            None => {
                let base = match &url {
                    Some(u) => format!(
                        "{}/{}-{}/{}",
                        args.prefix,
                        slug(&u.host, true),
                        u.port,
                        if u.user.is_empty() {
                            "default".to_string()
                        } else {
                            slug(&u.user, true)
                        }
                    ),
                    None => {
                        let p = f.path.strip_prefix("./").unwrap_or(&f.path);
                        let mut p = slug(p, true);
                        p.truncate(
                            128usize.saturating_sub(args.prefix.len() + f.rule_id.len() + 12),
                        );
                        format!(
                            "{}/{}/{}-l{}",
                            args.prefix,
                            p.trim_end_matches(['-', '.', '_']),
                            f.rule_id,
                            f.line
                        )
                    }
                };
                let n = taken.entry(base.clone()).or_insert(0);
                *n += 1;
                let name = if *n == 1 { base } else { format!("{base}-{n}") };
                plan.secrets.push(SecretPlan {
                    name,
                    value,
                    origins: vec![origin],
                });
                plan.secrets.len() - 1
            }
        };
        let route = match url.clone() {
            Some(u) if u.kind != DbKind::Other => {
                let key = (u.host.clone(), u.port, u.user.clone(), u.kind);
                match routes_by_key.get(&key) {
                    Some(&r) if plan.routes[r].secret == secret => Some(r),
                    Some(_) => {
                        problems.push(format!(
                            "{}:{}: the URL for {}@{} has a different password than another finding for the same user and server; import them one at a time (--path) after deciding which is current",
                            f.path, f.line, u.user, u.upstream()
                        ));
                        continue;
                    }
                    None => {
                        let idx = plan.routes.len();
                        let port = u32::from(args.listen_port) + idx as u32;
                        let Ok(port) = u16::try_from(port) else {
                            return Err(Error::usage("--listen-port: too few ports left above it for every route; choose a lower one"));
                        };
                        let listen = if args.listen_host.is_ipv6() {
                            format!("[{}]:{port}", args.listen_host)
                        } else {
                            format!("{}:{port}", args.listen_host)
                        };
                        let kind = if u.kind == DbKind::Postgres {
                            "db"
                        } else {
                            "redis"
                        };
                        let mut name =
                            slug(&format!("{kind}-{}-{}-{}", u.host, u.port, u.user), false);
                        name.truncate(63);
                        let name = name.trim_end_matches(['-', '_']).to_string();
                        plan.routes.push(RoutePlan {
                            name,
                            url: u,
                            listen,
                            secret,
                        });
                        routes_by_key.insert(key, idx);
                        Some(idx)
                    }
                }
            }
            _ => None,
        };
        plan.items.push(Item {
            finding: f,
            located: Located {
                value: located.value,
                whole,
            },
            secret,
            route,
            url: url.filter(|u| u.kind != DbKind::Other),
        });
    }
    if !problems.is_empty() {
        return Err(Error::usage(format!(
            "nothing imported: {} finding(s) are not where the scan saw them (the files changed since the scan):\n  {}\nrescan (`warden scan --json PATH > report.json`), review, and import again",
            problems.len(),
            problems.join("\n  ")
        )));
    }
    Ok(plan)
}

/// Rules whose whole match is a URL with the password as user info.
fn is_url_rule(rule_id: &str) -> bool {
    matches!(rule_id, "database-url-password" | "redis-url-password")
}

/// A URL match ends at whitespace or a quote; drop punctuation that closes
/// the surrounding code (`)`, `,`, `;`, `>`) rather than the URL.
fn trim_url_end(text: &str, r: Range<usize>) -> Range<usize> {
    let s = &text[r.clone()];
    let trimmed = s.trim_end_matches([')', ',', ';', '>', ']', '}']);
    r.start..r.start + trimmed.len()
}

fn render_plan(args: &ImportArgs, plan: &Plan) -> String {
    let mut out = String::new();
    for it in &plan.items {
        let f = &it.finding;
        let s = &plan.secrets[it.secret];
        let _ = write!(
            out,
            "{}:{}:{}: {} [{}] {} → secret {}",
            f.path, f.line, f.column, f.description, f.rule_id, f.redacted, s.name
        );
        if let Some(r) = it.route {
            let r = &plan.routes[r];
            let _ = write!(
                out,
                ", route {} ({} → {})",
                r.name,
                r.listen,
                r.url.upstream()
            );
        }
        out.push('\n');
    }
    for (f, why) in &plan.skipped {
        let _ = writeln!(
            out,
            "{}:{}: [{}] {} skipped: {why}",
            f.path, f.line, f.rule_id, f.redacted
        );
    }
    let _ = writeln!(
        out,
        "{} finding(s) selected: {} secret(s), {} route(s){}",
        plan.items.len(),
        plan.secrets.len(),
        plan.routes.len(),
        if args.rewrite { ", with --rewrite" } else { "" }
    );
    out
}

fn toml_escape(s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if c.is_control() => out.push_str(&format!("\\u{:04X}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

fn fragment_text(args: &ImportArgs, plan: &Plan) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "# Written by `warden import` at {}. Review it, then merge it into the\n# configuration and check it (`warden config check`). It holds no secret\n# values: those are in warden's store.",
        warden_core::timefmt::now_rfc3339()
    );
    for s in &plan.secrets {
        let _ = writeln!(out, "\n[[secret]]\nname = {}", toml_escape(&s.name));
        for o in &s.origins {
            let _ = writeln!(out, "# found at {o}");
        }
    }
    for r in &plan.routes {
        let u = &r.url;
        let kind = if u.kind == DbKind::Postgres {
            "postgres"
        } else {
            "redis"
        };
        let _ = writeln!(
            out,
            "\n[[route]]\nname = {}\nkind = \"{kind}\"",
            toml_escape(&r.name)
        );
        let _ = writeln!(out, "listen = {}", toml_escape(&r.listen));
        let _ = writeln!(out, "upstream = {}", toml_escape(&u.upstream()));
        let _ = writeln!(out, "{}", upstream_tls_line(u));
        let secret = toml_escape(&plan.secrets[r.secret].name);
        if u.user.is_empty() {
            let _ = writeln!(out, "credential = {{ secret = {secret} }}");
        } else {
            let _ = writeln!(
                out,
                "credential = {{ user = {}, secret = {secret} }}",
                toml_escape(&u.user)
            );
        }
        if args.allow.is_empty() {
            let _ = writeln!(
                out,
                "# name the workloads that may use this route (`warden workload list`):"
            );
        }
        let allow: Vec<String> = args.allow.iter().map(|a| toml_escape(a)).collect();
        let _ = writeln!(out, "allow = [{}]", allow.join(", "));
        let _ = writeln!(
            out,
            "# the application's URL becomes: {}",
            r.url.local_url(&r.listen)
        );
    }
    out
}

/// The route's `upstream_tls`, following what the application asked for.
fn upstream_tls_line(u: &DbUrl) -> String {
    match u.kind {
        DbKind::Redis if u.scheme.eq_ignore_ascii_case("rediss") => {
            "# the application used rediss://: TLS, chain and host name verified\nupstream_tls = { mode = \"verify-full\" }".into()
        }
        DbKind::Redis => {
            "# the application used plain redis:// (no TLS)\nupstream_tls = { mode = \"disable\" }".into()
        }
        _ => match u.param("sslmode") {
            Some(m @ ("disable" | "require" | "verify-ca" | "verify-full")) => {
                format!("# from the application's sslmode={m}\nupstream_tls = {{ mode = \"{m}\" }}")
            }
            _ if u.is_loopback() => {
                "# the server is on this machine and the application did not require TLS\nupstream_tls = { mode = \"disable\" }".into()
            }
            other => format!(
                "# the application's sslmode was {}: warden requires TLS; set mode = \"verify-full\" and ca_file to check the server\nupstream_tls = {{ mode = \"require\" }}",
                other.unwrap_or("not set (libpq's default, prefer)")
            ),
        },
    }
}

struct Rewrite {
    path: PathBuf,
    new_text: String,
    diff: String,
}

/// New file texts and their diffs (the old side shows redacted values).
fn rewrite_files(plan: &Plan) -> Result<Vec<Rewrite>> {
    let mut by_file: BTreeMap<&str, Vec<(&Item, String)>> = BTreeMap::new();
    for it in &plan.items {
        let replacement = match (it.route, &it.url) {
            (Some(r), Some(u)) => u.local_url(&plan.routes[r].listen),
            _ => format!("{REFERENCE_PREFIX}{}", plan.secrets[it.secret].name),
        };
        by_file
            .entry(it.finding.path.as_str())
            .or_default()
            .push((it, replacement));
    }
    let mut out = Vec::new();
    for (path, mut edits) in by_file {
        let text = &plan.texts[path];
        edits.sort_by_key(|(it, _)| range_of(it).start);
        // Overlapping findings (two rules on one value): the first wins.
        let mut kept: Vec<(&Item, String)> = Vec::new();
        for (it, rep) in edits {
            if kept
                .last()
                .is_some_and(|(k, _)| range_of(k).end > range_of(it).start)
            {
                continue;
            }
            kept.push((it, rep));
        }
        let mut new_text = String::with_capacity(text.len());
        let mut at = 0;
        for (it, rep) in &kept {
            let r = range_of(it);
            new_text.push_str(&text[at..r.start]);
            new_text.push_str(rep);
            at = r.end;
        }
        new_text.push_str(&text[at..]);
        let diff = diff_text(path, text, &kept);
        out.push(Rewrite {
            path: PathBuf::from(path),
            new_text,
            diff,
        });
    }
    Ok(out)
}

fn range_of(it: &Item) -> Range<usize> {
    if it.route.is_some() {
        it.located.whole.clone()
    } else {
        it.located.value.clone()
    }
}

/// A unified-style diff of the changed lines; the removed side shows each
/// value in its redacted form, never the value.
fn diff_text(path: &str, text: &str, edits: &[(&Item, String)]) -> String {
    let line_start = |i: usize| text[..i].rfind('\n').map_or(0, |p| p + 1);
    let line_end = |i: usize| text[i..].find('\n').map_or(text.len(), |p| i + p);
    let line_no = |i: usize| text[..i].matches('\n').count() + 1;
    // Group edits whose lines touch.
    let mut groups: Vec<(usize, usize, Vec<usize>)> = Vec::new();
    for (k, (it, _)) in edits.iter().enumerate() {
        let r = range_of(it);
        let (s, e) = (line_start(r.start), line_end(r.end.max(r.start + 1) - 1));
        match groups.last_mut() {
            Some(g) if s <= g.1 => {
                g.1 = g.1.max(e);
                g.2.push(k);
            }
            _ => groups.push((s, e, vec![k])),
        }
    }
    let mut out = format!("--- {path}\n+++ {path} (rewritten)\n");
    for (s, e, ks) in groups {
        let (mut old, mut new) = (String::new(), String::new());
        let mut at = s;
        for &k in &ks {
            let (it, rep) = &edits[k];
            let r = range_of(it);
            old.push_str(&text[at..r.start]);
            new.push_str(&text[at..r.start]);
            let v = &it.located.value;
            old.push_str(&text[r.start..v.start]);
            old.push_str(&it.finding.redacted);
            old.push_str(&text[v.end..r.end]);
            new.push_str(rep);
            at = r.end;
        }
        old.push_str(&text[at..e]);
        new.push_str(&text[at..e]);
        let _ = writeln!(
            out,
            "@@ -{},{} +{},{} @@",
            line_no(s),
            old.lines().count(),
            line_no(s),
            new.lines().count()
        );
        for l in old.lines() {
            let _ = writeln!(out, "-{l}");
        }
        for l in new.lines() {
            let _ = writeln!(out, "+{l}");
        }
    }
    out
}

fn backup_path(p: &Path) -> PathBuf {
    let mut s = p.as_os_str().to_owned();
    s.push(BACKUP_SUFFIX);
    PathBuf::from(s)
}

fn write_new(p: &Path, bytes: &[u8]) -> Result<()> {
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(p)
        .map_err(|e| Error::io("cannot create", p, &e))?;
    f.write_all(bytes)
        .and_then(|_| f.sync_all())
        .map_err(|e| Error::io("cannot write", p, &e))
}

/// Replaces a file's contents through a temp file and a rename, keeping its mode.
fn replace_file(p: &Path, bytes: &[u8]) -> Result<()> {
    let meta = std::fs::metadata(p).map_err(|e| Error::io("cannot stat", p, &e))?;
    let mut tmp = p.as_os_str().to_owned();
    tmp.push(".warden-tmp");
    let tmp = PathBuf::from(tmp);
    let _ = std::fs::remove_file(&tmp);
    write_new(&tmp, bytes)?;
    std::fs::set_permissions(&tmp, meta.permissions())
        .map_err(|e| Error::io("cannot set permissions on", &tmp, &e))?;
    std::fs::rename(&tmp, p).map_err(|e| Error::io("cannot replace", p, &e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slugs_and_prefixes() {
        assert_eq!(slug("App/Config/.env", true), "app-config-.env");
        assert_eq!(slug("127.0.0.1", false), "127-0-0-1");
        assert!(check_prefix("imported").is_ok());
        assert!(check_prefix("team/a").is_ok());
        assert!(check_prefix("Bad Prefix").is_err());
        assert!(check_prefix("a/").is_err());
    }

    #[test]
    fn path_selection() {
        let g = Glob::new("**/*.env").unwrap();
        assert!(path_matches("app/prod.env", "**/*.env", &g));
        let g = Glob::new("app").unwrap();
        assert!(path_matches("./app/x.py", "app", &g));
        assert!(!path_matches("apps/x.py", "app", &g));
    }

    #[test]
    fn url_end_trimmed_of_code_punctuation() {
        let t = "connect(postgres://a:b@h/db);";
        let r = trim_url_end(t, 8..t.len());
        assert_eq!(&t[r], "postgres://a:b@h/db");
    }

    #[test]
    fn toml_strings_are_escaped() {
        assert_eq!(toml_escape("a\"b\\c\n"), "\"a\\\"b\\\\c\\u000A\"");
    }
}
