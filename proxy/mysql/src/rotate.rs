//! `rotate = { method = "mysql", route = "…" }`: warden logs in to the
//! route's server as the route's user with the current password and sets
//! the new one with `SET PASSWORD` for its own account — which needs no
//! privilege (`ALTER USER` needs CREATE USER) and keeps the account's
//! authentication plugin: MariaDB `SET PASSWORD = PASSWORD('…')` (hashed by
//! the account's plugin, ed25519 included), MySQL `SET PASSWORD = '…'`
//! (caching_sha2_password / mysql_native_password as the account has). The
//! statement travels over the route's upstream TLS and is never logged; the
//! value is one of warden's generated passwords (URL-safe base64), so it
//! needs no escaping under any `sql_mode`.

use crate::packet::{read_packet, write_packet, ErrPacket, MAX_HANDSHAKE_PACKET};
use crate::upstream::{self, ClientParams, Failure, LoggedIn};
use crate::MysqlRoute;
use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use warden_core::config::Config;
use warden_core::error::Result;
use warden_core::rotation::{Apply, PasswordChanger};
use zeroize::Zeroizing;

/// The mysql rotation method: the routes' upstreams and users.
pub struct MysqlRotation {
    routes: HashMap<String, MysqlRoute>,
}

type Fut<'a> = Pin<Box<dyn Future<Output = std::result::Result<(), Apply>> + Send + 'a>>;

impl MysqlRotation {
    pub fn from_config(cfg: &Config) -> Result<MysqlRotation> {
        Ok(MysqlRotation {
            routes: MysqlRoute::from_config(cfg)?
                .into_iter()
                .map(|r| (r.name.clone(), r))
                .collect(),
        })
    }

    fn route(&self, name: &str) -> std::result::Result<&MysqlRoute, Apply> {
        self.routes
            .get(name)
            .ok_or_else(|| Apply::Unchanged(format!("there is no mysql route {name:?}")))
    }
}

/// Logs in as the route's user; also says whether the server is MariaDB.
async fn login_as(
    route: &MysqlRoute,
    password: &[u8],
) -> std::result::Result<(LoggedIn, bool), Failure> {
    let greeted = upstream::connect(&route.upstream).await?;
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
    let logged = upstream::login(&route.upstream, greeted, &params, &route.user, password).await?;
    Ok((logged, mariadb))
}

fn describe(f: &Failure) -> String {
    match f {
        Failure::Unreachable(m) | Failure::Unsupported(m) | Failure::Protocol(m) => m.clone(),
        Failure::Rejected(e) | Failure::Server(e) => {
            format!("{} ({}): {}", e.code, e.sqlstate_str(), e.message)
        }
    }
}

/// The COM_QUERY that sets `new` for the logged-in account.
fn set_password(mariadb: bool, new: &[u8]) -> Option<Zeroizing<Vec<u8>>> {
    let safe = !new.is_empty()
        && new
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~'));
    if !safe {
        return None;
    }
    let mut sql = Zeroizing::new(Vec::with_capacity(96 + new.len()));
    sql.push(0x03); // COM_QUERY
    if mariadb {
        sql.extend_from_slice(b"SET PASSWORD = PASSWORD('");
        sql.extend_from_slice(new);
        sql.extend_from_slice(b"')");
    } else {
        sql.extend_from_slice(b"SET PASSWORD = '");
        sql.extend_from_slice(new);
        sql.extend_from_slice(b"'");
    }
    Some(sql)
}

impl PasswordChanger for MysqlRotation {
    fn change<'a>(&'a self, route: &'a str, current: &'a [u8], new: &'a [u8]) -> Fut<'a> {
        Box::pin(async move {
            let r = self.route(route)?;
            let (mut logged, mariadb) = login_as(r, current).await.map_err(|f| {
                // No session, no SET PASSWORD: nothing changed.
                Apply::Unchanged(format!(
                    "route {route:?}: login as {:?} with the current password failed: {}",
                    r.user,
                    describe(&f)
                ))
            })?;
            let sql = set_password(mariadb, new).ok_or_else(|| {
                Apply::Unchanged("the new value is not a password warden generated".into())
            })?;
            write_packet(&mut logged.stream, 0, &sql)
                .await
                .map_err(|e| Apply::Unchanged(format!("sending SET PASSWORD failed: {e}")))?;
            drop(sql);
            let answer = tokio::time::timeout(
                std::time::Duration::from_secs(30),
                read_packet(&mut logged.stream, MAX_HANDSHAKE_PACKET),
            )
            .await;
            let p = match answer {
                Ok(Ok(p)) => p,
                Ok(Err(e)) => {
                    return Err(Apply::Unknown(format!("no answer to SET PASSWORD: {e}")))
                }
                Err(_) => {
                    return Err(Apply::Unknown(
                        "no answer to SET PASSWORD within 30 s".into(),
                    ))
                }
            };
            match p.payload.first() {
                Some(0x00) => {
                    let _ = write_packet(&mut logged.stream, 0, &[crate::packet::COM_QUIT]).await;
                    Ok(())
                }
                Some(0xff) => {
                    let e = ErrPacket::parse(&p.payload)
                        .map(|e| format!("{} ({}): {}", e.code, e.sqlstate_str(), e.message))
                        .unwrap_or_else(|e| e.0);
                    Err(Apply::Unchanged(format!("SET PASSWORD refused: {e}")))
                }
                _ => Err(Apply::Unknown(
                    "an unexpected answer to SET PASSWORD".into(),
                )),
            }
        })
    }

    fn probe<'a>(&'a self, route: &'a str, password: &'a [u8]) -> Fut<'a> {
        Box::pin(async move {
            let r = self.route(route)?;
            match login_as(r, password).await {
                Ok((mut logged, _)) => {
                    let _ = write_packet(&mut logged.stream, 0, &[crate::packet::COM_QUIT]).await;
                    Ok(())
                }
                Err(Failure::Rejected(e)) => Err(Apply::Unchanged(e.message)),
                Err(f) => Err(Apply::Unknown(describe(&f))),
            }
        })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn the_statement_fits_the_server_and_refuses_values_that_would_need_quoting() {
        let s = set_password(true, b"Ab9-_x").unwrap();
        assert_eq!(&s[1..], b"SET PASSWORD = PASSWORD('Ab9-_x')");
        let s = set_password(false, b"Ab9").unwrap();
        assert_eq!(&s[1..], b"SET PASSWORD = 'Ab9'");
        assert!(set_password(true, b"a'b").is_none());
        assert!(set_password(true, b"a\\b").is_none());
        assert!(set_password(false, b"").is_none());
    }
}
