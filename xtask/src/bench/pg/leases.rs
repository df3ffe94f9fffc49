//! Dynamic credential issuance: `warden lease bench` creates leases against
//! the bench's PostgreSQL — with `fsync = on` for this part — with the
//! default config: a role with a SCRAM verifier (16 iterations), VALID UNTIL,
//! membership in the route's group role (which holds the two grants) and a
//! comment, in one transaction, after the lease row is fsynced and before
//! its audit record is. Beside it, a same-run baseline: pgbench running that
//! same transaction itself, with no store, audit or password generation.
//! Vault's published sample (259 leases/s, mean 40 ms, p99 68 ms) is printed
//! as an anchor, not as a same-run comparison.

use super::*;

const ADMIN: &str = "warden_admin";
const DB: &str = "leases";
const LEASES: usize = 2000;
const CONCURRENCY: usize = 4;
/// Vault database secrets engine, dynamic PostgreSQL credentials (published sample).
const VAULT_PER_SECOND: f64 = 259.0;

pub(super) struct LeaseReport {
    per_second: f64,
    p50_ms: f64,
    p99_ms: f64,
    mean_ms: f64,
    revoke_per_second: f64,
    raw_per_second: f64,
    raw_p99_ms: f64,
}

impl Lab {
    fn psql_super(&self, db: &str, sql: &str) -> Result<()> {
        let mut psql = Command::new("psql");
        psql.args(["-X", "-q", "-v", "ON_ERROR_STOP=1", "-h"])
            .arg(self.pg_dir())
            .args(["-p", &self.pg_port.to_string(), "-U", "postgres", "-d", db]);
        run_with_stdin(&mut psql, sql.as_bytes())
    }
}

pub(super) fn run(lab: &Lab, warden: &Path) -> Result<LeaseReport> {
    let admin_pw = random_alphanumeric(24)?;
    lab.psql_super(
        "postgres",
        &format!(
            "CREATE ROLE {ADMIN} LOGIN CREATEROLE PASSWORD '{admin_pw}';\n\
             CREATE DATABASE {DB} OWNER {ADMIN};\n\
             ALTER SYSTEM SET fsync = on;\nSELECT pg_reload_conf();\n"
        ),
    )?;
    lab.psql_super(
        DB,
        &format!(
            "CREATE SCHEMA reports AUTHORIZATION {ADMIN};\n\
             CREATE TABLE reports.sales(id int);\nALTER TABLE reports.sales OWNER TO {ADMIN};\nCHECKPOINT;\n"
        ),
    )?;

    // Baseline: pgbench runs the same transaction as the admin, as many
    // times as warden creates leases, with a
    // group role like the one warden makes (its own, dropped afterwards).
    lab.psql_super(
        DB,
        &format!(
            "CREATE ROLE raw_group NOLOGIN ROLE {ADMIN};\n\
             GRANT USAGE ON SCHEMA reports TO raw_group;\n\
             GRANT SELECT ON ALL TABLES IN SCHEMA reports TO raw_group;\n"
        ),
    )?;
    let logs = lab.dir.join("logs");
    let script = logs.join("create_role.sql");
    std::fs::write(
        &script,
        format!(
            "\\set r random(1, 9000000000000000000)\n\
             BEGIN;\n\
             CREATE ROLE raw_:r LOGIN PASSWORD 'SCRAM-SHA-256$16:c2FsdHNhbHRzYWx0c2FsdA==$AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=:AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=' VALID UNTIL '2100-01-01 00:00:00+00' IN ROLE raw_group ROLE {ADMIN};\n\
             COMMENT ON ROLE raw_:r IS 'baseline';\n\
             COMMIT;\n"
        ),
    )?;
    let mut pgbench = Command::new("pgbench");
    pgbench
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &lab.pg_port.to_string(),
            "-U",
            ADMIN,
        ])
        // The same number of leases as warden creates, split over the clients.
        .args([
            "-n",
            "-M",
            "simple",
            "-t",
            &(LEASES / CONCURRENCY).to_string(),
        ])
        .args(["-c", &CONCURRENCY.to_string(), "-j", "2", "--log"])
        .arg(format!("--log-prefix={}", logs.join("raw").display()))
        .arg("-f")
        .arg(&script)
        .arg(DB)
        .env("PGPASSWORD", &admin_pw)
        .env("PGSSLMODE", "disable")
        .current_dir(&logs);
    let out = run_captured(&mut pgbench)?;
    let raw = parse_pgbench_output(&out)
        .with_context(|| format!("could not read pgbench's summary:\n{out}"))?;
    let mut raw_lat = read_latency_logs(&logs, "raw")?;
    raw_lat.sort_unstable();
    let raw_p99_ms = percentile(&raw_lat, 0.99) / 1000.0;
    lab.psql_super(
        DB,
        "DO $$ DECLARE r record; BEGIN\n\
         FOR r IN SELECT rolname FROM pg_roles WHERE rolname LIKE 'raw\\_%' LOOP\n\
         EXECUTE format('DROP OWNED BY %I', r.rolname); EXECUTE format('DROP ROLE %I', r.rolname);\n\
         END LOOP; END $$;\n",
    )?;
    // Both runs start from a vacuumed catalog and a fresh checkpoint (the
    // baseline's dead role rows and dirty pages would otherwise land on warden).
    lab.psql_super(
        DB,
        "VACUUM pg_catalog.pg_authid, pg_catalog.pg_auth_members, pg_catalog.pg_shdepend, \
         pg_catalog.pg_shdescription;\nCHECKPOINT;\n",
    )?;

    // warden: its own data dir (the lease bench opens it offline).
    let wdir = lab.dir.join("warden-leases");
    std::fs::create_dir_all(&wdir)?;
    set_mode(&wdir, 0o700)?;
    let config = wdir.join("warden.toml");
    std::fs::write(
        &config,
        format!(
            "data_dir = \"{data}\"\ntrust_domain = \"example.org\"\n\
             \n[admin]\nsocket = \"{admin}\"\n\n[metrics]\nlisten = \"off\"\n\
             \n[[workload]]\nname = \"bench\"\nspiffe_id = \"spiffe://example.org/bench\"\n\
             selectors = {{ uid = {uid} }}\n\
             \n[[route]]\nname = \"leases\"\nkind = \"postgres\"\n\
             listen = \"127.0.0.1:1\"\nupstream = \"127.0.0.1:{pg}\"\n\
             upstream_tls = {{ mode = \"disable\" }}\nallow = [\"bench\"]\ndatabases = [\"{DB}\"]\n\
             \n[route.credential]\nuser = \"{ADMIN}\"\nsecret = \"leases/admin\"\n\
             \n[route.credential.dynamic]\nttl = \"1h\"\n\
             grants = [\"GRANT USAGE ON SCHEMA reports TO {{role}}\", \"GRANT SELECT ON ALL TABLES IN SCHEMA reports TO {{role}}\"]\n",
            data = wdir.join("data").display(),
            admin = wdir.join("admin.sock").display(),
            uid = super::super::effective_uid().unwrap_or(0),
            pg = lab.pg_port,
        ),
    )?;
    let warden_cmd = |args: &[&str]| {
        let mut c = Command::new(warden);
        c.arg("--config").arg(&config).args(args);
        c
    };
    run_captured(&mut warden_cmd(&["init"]))?;
    run_with_stdin(
        &mut warden_cmd(&["secret", "put", "leases/admin"]),
        admin_pw.as_bytes(),
    )?;
    let out = run_captured(&mut warden_cmd(&[
        "lease",
        "bench",
        "--route",
        "leases",
        "--count",
        &LEASES.to_string(),
        "--concurrency",
        &CONCURRENCY.to_string(),
    ]))?;
    let v: serde_json::Value = serde_json::from_str(&out)
        .with_context(|| format!("`warden lease bench` printed no JSON:\n{out}"))?;
    let f = |k: &str| v[k].as_f64().unwrap_or(0.0);
    Ok(LeaseReport {
        per_second: f("per_second"),
        p50_ms: f("p50_ms"),
        p99_ms: f("p99_ms"),
        mean_ms: f("mean_ms"),
        revoke_per_second: f("revoke_per_second"),
        raw_per_second: raw.tps,
        raw_p99_ms,
    })
}

pub(super) fn print(r: &LeaseReport) {
    println!(
        "\nDynamic credential issuance ({LEASES} leases, {CONCURRENCY} concurrent, PostgreSQL fsync on)"
    );
    println!(
        "{:<34} {:>9} {:>8} {:>8} {:>8}",
        "", "leases/s", "mean ms", "p50 ms", "p99 ms"
    );
    println!(
        "{:<34} {:>9.0} {:>8.2} {:>8.2} {:>8.2}",
        "warden lease (role+grants+store)", r.per_second, r.mean_ms, r.p50_ms, r.p99_ms
    );
    println!(
        "{:<34} {:>9.0} {:>8} {:>8} {:>8.2}",
        "baseline: pgbench same SQL", r.raw_per_second, "", "", r.raw_p99_ms
    );
    println!(
        "{:<34} {:>9.0} {:>8.2} {:>8} {:>8.2}",
        "anchor: Vault published sample", VAULT_PER_SECOND, 40.0, "", 68.0
    );
    println!(
        "warden = {:.2}x the same-run baseline, {:.2}x Vault's published rate (target >= 2x, p99 <= 20 ms: {}); revocation {:.0} leases/s",
        ratio(r.per_second, r.raw_per_second),
        ratio(r.per_second, VAULT_PER_SECOND),
        if r.per_second >= 2.0 * VAULT_PER_SECOND && r.p99_ms <= 20.0 {
            "met"
        } else {
            "NOT met"
        },
        r.revoke_per_second
    );
}
