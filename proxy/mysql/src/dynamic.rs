//! Dynamic credentials on mysql routes (`credential.dynamic`): a MySQL user
//! per workload lease. The lease bookkeeping — lease rows written ahead,
//! audit records, renewal while sessions are open, expiry at `ttl` /
//! `max_ttl`, the orphan sweep at start-up, `warden lease list/revoke` — is
//! `warden_core::leases`, shared with PostgreSQL routes; this module is the
//! MySQL part of it ([`MysqlLeases`], a [`LeaseBackend`]) and what a session
//! of a dynamic route needs ([`acquire`]).
//!
//! Per lease warden logs in upstream as the route's `credential.user` with
//! its secret (the administrative login) and runs
//!
//! ```sql
//! CREATE USER 'w_web_3f9a0c1e'@'%' IDENTIFIED BY PASSWORD '*…';  -- MariaDB
//! GRANT `orders_reader` TO 'w_web_3f9a0c1e'@'%';                -- role = "…"
//! GRANT SELECT ON orders.* TO 'w_web_3f9a0c1e'@'%';             -- grants, {role} replaced
//! ```
//!
//! and, with `role`, logs in once as the new user to run `SET DEFAULT
//! ROLE` for itself (for another user it would need UPDATE on `mysql.*`).
//!
//! The password is 256 random bits; on MariaDB only its
//! `mysql_native_password` hash travels (MySQL, which rewrites passwords
//! out of its logs, gets `IDENTIFIED BY '…'`). A statement the server
//! refuses after CREATE USER drops the user again. Revocation (expiry,
//! `warden lease revoke`, shutdown) runs `DROP USER IF EXISTS`, so no new
//! login succeeds, then ends the user's connections: `KILL USER` on
//! MariaDB, `KILL <id>` for each of them on MySQL. MySQL accounts have no
//! expiry time like PostgreSQL's `VALID UNTIL`: renewal changes nothing on
//! the server, warden drops the user when the lease ends (and the start-up
//! sweep drops those of a process that died).

use crate::packet::{read_packet, write_packet, ErrPacket, Reader, MAX_HANDSHAKE_PACKET};
use crate::upstream::{self, ClientParams, Failure, LoggedIn};
use crate::MysqlRoute;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;
use warden_core::config::{Config, RouteKind};
use warden_core::error::{Error, Result};
use warden_core::leases::{
    AdminLogin, DynamicSpec, LeaseBackend, LeaseFuture, LINK_FAILED, REFUSED,
};
use warden_core::pgwire::upstream::UpstreamStream;
use zeroize::Zeroizing;

/// Longest an administrative statement may take.
const STATEMENT_TIMEOUT: Duration = Duration::from_secs(30);
const COM_QUERY: u8 = 0x03;
/// Longest lease user name: MySQL's limit (MariaDB's is 80).
const MAX_USER_LEN: usize = 32;
/// Host part of every lease user.
const HOST: &str = "%";

/// One dynamic mysql route's server and privileges.
struct RouteSpec {
    route: Arc<MysqlRoute>,
    role: Option<String>,
    grants: Vec<String>,
}

/// The MySQL [`LeaseBackend`]: one per dynamic mysql route.
pub struct MysqlLeases {
    spec: RouteSpec,
}

/// The lease settings of every dynamic mysql route in `cfg`.
pub fn dynamic_specs(cfg: &Config) -> Result<Vec<DynamicSpec>> {
    let routes: HashMap<String, MysqlRoute> = MysqlRoute::from_config(cfg)?
        .into_iter()
        .map(|r| (r.name.clone(), r))
        .collect();
    let mut out = Vec::new();
    for (r, route) in cfg
        .routes
        .iter()
        .filter(|r| r.kind == RouteKind::Mysql)
        .filter_map(|r| Some(r).zip(routes.get(&r.name).map(clone_route)))
    {
        let Some(d) = r.credential.as_ref().and_then(|c| c.dynamic.as_ref()) else {
            continue;
        };
        let backend = Arc::new(MysqlLeases {
            spec: RouteSpec {
                role: d.role.clone(),
                grants: d.grants.clone(),
                route: Arc::new(route),
            },
        });
        let cache_ttl = backend.spec.route.cache_ttl;
        if let Some(spec) =
            DynamicSpec::with_backend(r, d, backend, &cfg.environment, cache_ttl, MAX_USER_LEN)
        {
            out.push(spec);
        }
    }
    Ok(out)
}

/// The route's upstream and names (the administrative login's target).
fn clone_route(r: &MysqlRoute) -> MysqlRoute {
    MysqlRoute {
        name: r.name.clone(),
        listen: r.listen,
        upstream: upstream::Target {
            host: r.upstream.host.clone(),
            port: r.upstream.port,
            tls: r.upstream.tls.clone(),
            server_name: r.upstream.server_name.clone(),
            ca_label: r.upstream.ca_label.clone(),
            connect_timeout: r.upstream.connect_timeout,
        },
        user: r.user.clone(),
        secret: r.secret.clone(),
        env: r.env.clone(),
        cache_ttl: r.cache_ttl,
        allow: r.allow.clone(),
        client_tls: r.client_tls,
        pool: r.pool.clone(),
        dynamic: r.dynamic,
        kernel_relay: r.kernel_relay,
    }
}

/// `'name'@'%'`: lease user names are `[a-z0-9_]` (see `role_name`), so
/// they need no escaping; anything else is refused.
fn account(name: &str) -> Result<String> {
    if name.is_empty()
        || !name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
    {
        return Err(Error::internal(format!(
            "lease user name {name:?} is not plain"
        )));
    }
    Ok(format!("'{name}'@'{HOST}'"))
}

/// `` `role` `` (the config check refuses quotes and control characters).
fn quote_role(role: &str) -> String {
    format!("`{}`", role.replace('`', "``"))
}

/// The `mysql_native_password` hash: `*` and upper-case hex of
/// SHA1(SHA1(password)).
fn native_hash(password: &[u8]) -> Zeroizing<String> {
    let stage2 = crate::auth::sha1(&[crate::auth::sha1(&[password]).as_ref()]);
    let mut out = Zeroizing::new(String::with_capacity(41));
    out.push('*');
    for b in stage2.as_ref() {
        out.push_str(&format!("{b:02X}"));
    }
    out
}

/// The CREATE USER statement (its password part: a hash on MariaDB).
fn create_user(account: &str, password: &[u8], mariadb: bool) -> Result<Zeroizing<String>> {
    if password.is_empty()
        || !password
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_'))
    {
        return Err(Error::internal(
            "the lease password is not one warden generated",
        ));
    }
    Ok(if mariadb {
        Zeroizing::new(format!(
            "CREATE USER {account} IDENTIFIED BY PASSWORD '{}'",
            native_hash(password).as_str()
        ))
    } else {
        let mut s = Zeroizing::new(format!("CREATE USER {account} IDENTIFIED BY '"));
        s.push_str(&String::from_utf8_lossy(password));
        s.push('\'');
        s
    })
}

/// The statements after CREATE USER: the role, then the grants with
/// `{role}` replaced by the account. On MySQL the role becomes the default
/// here (`SET DEFAULT ROLE … TO`, CREATE USER suffices); on MariaDB the
/// lease user sets it itself, which needs no privilege (`SET DEFAULT ROLE
/// … FOR` another user needs UPDATE on the `mysql` schema).
fn privilege_sql(
    role: Option<&str>,
    grants: &[String],
    account: &str,
    mariadb: bool,
) -> Vec<String> {
    let mut out = Vec::new();
    if let Some(r) = role {
        out.push(format!("GRANT {} TO {account}", quote_role(r)));
        if !mariadb {
            out.push(format!("SET DEFAULT ROLE {} TO {account}", quote_role(r)));
        }
    }
    for g in grants {
        out.push(g.replace("{role}", account));
    }
    out
}

/// An administrative session on the route's server.
struct Admin {
    stream: UpstreamStream,
    mariadb: bool,
    route: String,
}

/// What one statement answered.
enum Answer {
    Ok,
    /// A result set's rows (text protocol, NULL as None).
    Rows(Vec<Vec<Option<Vec<u8>>>>),
}

impl Admin {
    async fn login(spec: &RouteSpec, admin: &AdminLogin) -> Result<Admin> {
        let route = &spec.route;
        let failed = |f: &Failure| {
            let why = match f {
                Failure::Unreachable(m) | Failure::Unsupported(m) | Failure::Protocol(m) => {
                    m.clone()
                }
                Failure::Rejected(e) | Failure::Server(e) => {
                    format!("{} ({}): {}", e.code, e.sqlstate_str(), e.message)
                }
            };
            Error::unavailable(format!(
                "route {:?}: the administrative login {:?} (secret {}) failed: {why}",
                route.name, admin.user, admin.label
            ))
        };
        let greeted = upstream::connect(&route.upstream)
            .await
            .map_err(|f| failed(&f))?;
        let mariadb = String::from_utf8_lossy(&greeted.greeting.server_version).contains("MariaDB");
        let params = ClientParams {
            capabilities: 0,
            mariadb_caps: 0,
            max_packet: 1 << 24,
            // utf8mb4_general_ci
            charset: 45,
            database: None,
            attrs: None,
        };
        let LoggedIn { stream, .. } = upstream::login(
            &route.upstream,
            greeted,
            &params,
            &admin.user,
            &admin.password,
        )
        .await
        .map_err(|f| failed(&f))?;
        Ok(Admin {
            stream,
            mariadb,
            route: route.name.clone(),
        })
    }

    fn broken(&self, what: impl std::fmt::Display) -> Error {
        Error::unavailable(format!("route {:?}: {LINK_FAILED}: {what}", self.route))
    }

    /// Runs one statement; a server ERR is `Err(Ok(err))`, a broken session
    /// `Err(Err(error))`.
    async fn run(
        &mut self,
        sql: &str,
    ) -> std::result::Result<Answer, std::result::Result<ErrPacket, Error>> {
        let mut payload = Zeroizing::new(Vec::with_capacity(1 + sql.len()));
        payload.push(COM_QUERY);
        payload.extend_from_slice(sql.as_bytes());
        let fut = async {
            write_packet(&mut self.stream, 0, &payload).await?;
            let first = read_packet(&mut self.stream, MAX_HANDSHAKE_PACKET).await?;
            match first.payload.first() {
                Some(0x00) => return std::io::Result::Ok(Ok(Answer::Ok)),
                Some(0xff) => {
                    return Ok(Err(ErrPacket::parse(&first.payload).unwrap_or_else(|e| {
                        ErrPacket::new(1105, "HY000", format!("malformed ERR: {}", e.0))
                    })))
                }
                _ => {}
            }
            let columns = Reader::new(&first.payload)
                .lenenc_int()
                .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e.0))?;
            // Column definitions, then EOF (no CLIENT_DEPRECATE_EOF asked).
            for _ in 0..=columns {
                read_packet(&mut self.stream, MAX_HANDSHAKE_PACKET).await?;
            }
            let mut rows = Vec::new();
            loop {
                let p = read_packet(&mut self.stream, MAX_HANDSHAKE_PACKET).await?;
                match p.payload.first() {
                    Some(0xfe) if p.payload.len() < 9 => return Ok(Ok(Answer::Rows(rows))),
                    Some(0xff) => {
                        return Ok(Err(ErrPacket::parse(&p.payload).unwrap_or_else(|e| {
                            ErrPacket::new(1105, "HY000", format!("malformed ERR: {}", e.0))
                        })))
                    }
                    _ => rows.push(crate::pool::row_values(&p.payload).ok_or_else(|| {
                        std::io::Error::new(std::io::ErrorKind::InvalidData, "a malformed row")
                    })?),
                }
            }
        };
        match tokio::time::timeout(STATEMENT_TIMEOUT, fut).await {
            Ok(Ok(Ok(a))) => Ok(a),
            Ok(Ok(Err(e))) => Err(Ok(e)),
            Ok(Err(e)) => Err(Err(self.broken(e))),
            Err(_) => Err(Err(self.broken(format!(
                "no answer within {} s",
                STATEMENT_TIMEOUT.as_secs()
            )))),
        }
    }

    /// Runs `sql`: a server refusal is an error naming the statement's verb
    /// (never its text, which may hold a password hash).
    async fn exec(&mut self, sql: &str) -> Result<Answer> {
        self.run(sql).await.map_err(|r| match r {
            Ok(e) => Error::unavailable(format!(
                "route {:?}: {REFUSED}: {} {} ({}): {}",
                self.route,
                verb(sql),
                e.code,
                e.sqlstate_str(),
                e.message
            )),
            Err(e) => e,
        })
    }

    async fn quit(mut self) {
        let _ = write_packet(&mut self.stream, 0, &[crate::packet::COM_QUIT]).await;
    }

    /// Ends every connection of `name`: MariaDB's `KILL USER`, else the
    /// ids of the process list, one `KILL` each (those that ended meanwhile
    /// answer 1094, ignored).
    async fn kill_user(&mut self, name: &str) -> Result<()> {
        if self.mariadb {
            self.exec(&format!("KILL USER '{name}'")).await?;
            return Ok(());
        }
        let ids = match self
            .exec(&format!(
                "SELECT id FROM information_schema.processlist WHERE user = '{name}'"
            ))
            .await?
        {
            Answer::Rows(rows) => rows,
            Answer::Ok => Vec::new(),
        };
        for id in ids
            .into_iter()
            .filter_map(|r| r.into_iter().next().flatten())
        {
            let id = String::from_utf8_lossy(&id).into_owned();
            if id.bytes().all(|b| b.is_ascii_digit()) && !id.is_empty() {
                match self.run(&format!("KILL {id}")).await {
                    Ok(_) => {}
                    Err(Ok(e)) if e.code == 1094 => {}
                    Err(Ok(e)) => {
                        return Err(Error::unavailable(format!(
                            "route {:?}: {REFUSED}: KILL ({}): {}",
                            self.route, e.code, e.message
                        )))
                    }
                    Err(Err(e)) => return Err(e),
                }
            }
        }
        Ok(())
    }
}

/// The first word of a statement, for messages.
fn verb(sql: &str) -> String {
    sql.split_whitespace().take(2).collect::<Vec<_>>().join(" ")
}

impl MysqlLeases {
    async fn create_user(
        &self,
        admin: &AdminLogin,
        row: &warden_core::store::LeaseRow,
        password: &[u8],
    ) -> Result<()> {
        let account = account(&row.role)?;
        let mut s = Admin::login(&self.spec, admin).await?;
        let create = create_user(&account, password, s.mariadb)?;
        s.exec(&create).await?;
        drop(create);
        let mariadb = s.mariadb;
        for sql in privilege_sql(
            self.spec.role.as_deref(),
            &self.spec.grants,
            &account,
            mariadb,
        ) {
            if let Err(e) = s.exec(&sql).await {
                if e.message.contains(REFUSED) {
                    s.exec(&format!("DROP USER IF EXISTS {account}")).await?;
                }
                return Err(self.with_hint(e));
            }
        }
        if let Some(role) = self.spec.role.as_ref().filter(|_| mariadb) {
            let own = AdminLogin {
                user: row.role.clone(),
                password: Zeroizing::new(password.to_vec()),
                label: format!("lease {}", row.id),
            };
            let set = async {
                let mut u = Admin::login(&self.spec, &own).await?;
                u.exec(&format!("SET DEFAULT ROLE {}", quote_role(role)))
                    .await?;
                u.quit().await;
                Ok::<(), Error>(())
            };
            if let Err(e) = set.await {
                // Nothing of the lease may stay: the user goes again
                // (the row stays for the sweep if that fails too).
                s.exec(&format!("DROP USER IF EXISTS {account}")).await?;
                return Err(Error::unavailable(format!(
                    "route {:?}: {REFUSED}: the lease user could not set its default role: {}",
                    self.spec.route.name, e.message
                )));
            }
        }
        s.quit().await;
        Ok(())
    }

    /// A refusal naming the config key when the role does not exist.
    fn with_hint(&self, e: Error) -> Error {
        match &self.spec.role {
            Some(r) if e.message.contains(" 1959 (") => Error {
                message: format!(
                    "{}; credential.dynamic.role {r:?} of route {:?} is not a role on the server: CREATE ROLE {} and grant it what the workloads need, or fix the name",
                    e.message,
                    self.spec.route.name,
                    quote_role(r)
                ),
                ..e
            },
            _ => e,
        }
    }

    async fn drop_user(
        &self,
        admin: &AdminLogin,
        row: &warden_core::store::LeaseRow,
    ) -> Result<()> {
        let account = account(&row.role)?;
        let mut s = Admin::login(&self.spec, admin).await?;
        // No new login first, then the open ones end.
        s.exec(&format!("DROP USER IF EXISTS {account}")).await?;
        s.kill_user(&row.role).await?;
        s.quit().await;
        Ok(())
    }
}

impl LeaseBackend for MysqlLeases {
    fn create<'a>(
        &'a self,
        admin: &'a AdminLogin,
        row: &'a warden_core::store::LeaseRow,
        password: &'a [u8],
    ) -> LeaseFuture<'a> {
        Box::pin(self.create_user(admin, row, password))
    }

    fn renew<'a>(
        &'a self,
        _admin: &'a AdminLogin,
        _row: &'a warden_core::store::LeaseRow,
        _until: i64,
    ) -> LeaseFuture<'a> {
        // MySQL accounts have no expiry time: warden drops the user when
        // the lease ends.
        Box::pin(async { Ok(()) })
    }

    fn revoke<'a>(
        &'a self,
        admin: &'a AdminLogin,
        row: &'a warden_core::store::LeaseRow,
    ) -> LeaseFuture<'a> {
        Box::pin(self.drop_user(admin, row))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn statements_carry_a_hash_on_mariadb_and_quote_names() {
        let a = account("w_web_0a1b2c3d").unwrap();
        assert_eq!(a, "'w_web_0a1b2c3d'@'%'");
        assert!(account("x'y").is_err() && account("").is_err());
        let pw = b"Ab9-_x";
        let sql = create_user(&a, pw, true).unwrap();
        assert!(!sql.contains("Ab9-_x"), "{}", *sql);
        // SHA1(SHA1("Ab9-_x")), as MariaDB's PASSWORD() computes it.
        assert!(sql.starts_with("CREATE USER 'w_web_0a1b2c3d'@'%' IDENTIFIED BY PASSWORD '*"));
        assert_eq!(
            sql.len(),
            "CREATE USER 'w_web_0a1b2c3d'@'%' IDENTIFIED BY PASSWORD '*'".len() + 40
        );
        let sql = create_user(&a, pw, false).unwrap();
        assert!(sql.ends_with("IDENTIFIED BY 'Ab9-_x'"));
        assert!(create_user(&a, b"a'b", false).is_err());
        let p = privilege_sql(
            Some("orders_reader"),
            &["GRANT SELECT ON orders.* TO {role}".into()],
            &a,
            true,
        );
        assert_eq!(
            p,
            vec![
                "GRANT `orders_reader` TO 'w_web_0a1b2c3d'@'%'".to_string(),
                "GRANT SELECT ON orders.* TO 'w_web_0a1b2c3d'@'%'".into(),
            ]
        );
        let mysql = privilege_sql(Some("r"), &[], &a, false);
        assert_eq!(mysql[1], "SET DEFAULT ROLE `r` TO 'w_web_0a1b2c3d'@'%'");
        assert_eq!(
            verb("CREATE USER 'x'@'%' IDENTIFIED BY PASSWORD '*00'"),
            "CREATE USER"
        );
    }

    #[test]
    fn the_native_hash_is_mysqls() {
        // SELECT PASSWORD('secret') on MariaDB.
        assert_eq!(
            native_hash(b"secret").as_str(),
            "*14E65567ABDB5135D0CFD9A70B3032C179A49EE7"
        );
    }
}
