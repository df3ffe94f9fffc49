//! Dynamic credentials on redis routes (`credential.dynamic`): a Redis ACL
//! user per workload lease. The lease bookkeeping — lease rows written
//! ahead, audit records, renewal while sessions are open, expiry at `ttl` /
//! `max_ttl`, the orphan sweep at start-up, `warden lease list/revoke` — is
//! `warden_core::leases`, shared with PostgreSQL and MySQL routes; this
//! module is the Redis part of it ([`RedisLeases`], a [`LeaseBackend`]) and
//! what a session of a dynamic route needs ([`acquire`]).
//!
//! Per lease warden logs in upstream as the route's `credential.user` with
//! its secret (the administrative login, which needs `+acl` and
//! `+client|kill`) and runs
//!
//! ```text
//! ACL SETUSER warden_web_3f9a0c1e reset on >PASSWORD ~app:* +@read …
//! ```
//!
//! with the rules of `credential.dynamic.acl` (checked by `warden check`:
//! no password or state rules, which warden owns). `reset` first, so the
//! user has exactly those rules. The password is 256 random bits; Redis
//! keeps only its SHA-256. Revocation (expiry, `warden lease revoke`,
//! shutdown) runs `ACL DELUSER` — no new login succeeds, and Redis ends the
//! user's open connections with it — then `CLIENT KILL USER` for any the
//! server kept (answered "No such user" once the user is gone: fine).
//!
//! Redis users have no expiry time: renewal changes nothing on the server,
//! warden deletes the user when the lease ends. Lease users are never
//! saved (`ACL SAVE`): they live in the server's memory only, so a restart
//! of Redis drops them (their sessions end; the next session gets a new
//! lease), and the start-up sweep deletes those of a warden that died.

use crate::resp::encode_command;
use crate::rotate::{quit, reply_text, run};
use crate::{login_as, RedisRoute, UpstreamFailure};
use std::collections::HashMap;
use std::sync::Arc;
use warden_core::config::{Config, RouteKind};
use warden_core::error::{Error, Result};
use warden_core::leases::{
    AdminLogin, DynamicSpec, LeaseBackend, LeaseFuture, LINK_FAILED, REFUSED,
};
use warden_core::pgwire::upstream::UpstreamStream;
use warden_core::store::LeaseRow;
use zeroize::Zeroizing;

/// Longest lease user name warden makes (Redis sets no limit).
const MAX_USER_LEN: usize = 64;

/// The Redis [`LeaseBackend`]: one per dynamic redis route.
pub struct RedisLeases {
    route: RedisRoute,
    /// `credential.dynamic.acl`, one `ACL SETUSER` argument each.
    rules: Vec<String>,
}

/// The lease settings of every dynamic redis route in `cfg`.
pub fn dynamic_specs(cfg: &Config) -> Result<Vec<DynamicSpec>> {
    let mut routes: HashMap<String, RedisRoute> = RedisRoute::from_config(cfg)?
        .into_iter()
        .map(|r| (r.name.clone(), r))
        .collect();
    let mut out = Vec::new();
    for (i, r) in cfg.routes.iter().enumerate() {
        if r.kind != RouteKind::Redis {
            continue;
        }
        let Some(d) = r.credential.as_ref().and_then(|c| c.dynamic.as_ref()) else {
            continue;
        };
        let Some(route) = routes.remove(&r.name) else {
            continue;
        };
        let rules = warden_core::config::redis_acl_rules(d.acl.as_deref().unwrap_or_default())
            .map_err(|e| Error::usage(format!("route[{i}].credential.dynamic.acl: {e}")))?;
        let cache_ttl = route.cache_ttl;
        let backend = Arc::new(RedisLeases { route, rules });
        if let Some(spec) =
            DynamicSpec::with_backend(r, d, backend, &cfg.environment, cache_ttl, MAX_USER_LEN)
        {
            out.push(spec);
        }
    }
    Ok(out)
}

/// Lease user names are `[a-z0-9_]` (`leases::role_name`): one RESP
/// argument, never mistaken for a rule.
fn check_name(name: &str) -> Result<()> {
    if name.is_empty()
        || !name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
    {
        return Err(Error::internal(format!(
            "lease user name {name:?} is not plain"
        )));
    }
    Ok(())
}

/// `ACL SETUSER name reset on >password rules…` (zeroized with its buffer).
fn set_user(name: &str, password: &[u8], rules: &[String]) -> Result<Zeroizing<Vec<u8>>> {
    if password.is_empty()
        || !password
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_'))
    {
        return Err(Error::internal(
            "the lease password is not one warden generated",
        ));
    }
    let mut pw = Zeroizing::new(Vec::with_capacity(1 + password.len()));
    pw.push(b'>');
    pw.extend_from_slice(password);
    let mut out = Zeroizing::new(Vec::with_capacity(128 + pw.len()));
    let mut args: Vec<&[u8]> = vec![b"ACL", b"SETUSER", name.as_bytes(), b"reset", b"on", &pw];
    args.extend(rules.iter().map(|r| r.as_bytes()));
    encode_command(&mut out, args.into_iter());
    Ok(out)
}

impl RedisLeases {
    async fn admin(&self, admin: &AdminLogin) -> Result<UpstreamStream> {
        login_as(&self.route, &admin.user, &admin.password)
            .await
            .map(|l| l.stream)
            .map_err(|f| {
                let why = match f {
                    UpstreamFailure::Unreachable(m) | UpstreamFailure::Rejected(m) => m,
                };
                Error::unavailable(format!(
                    "route {:?}: the administrative login {:?} (secret {}) failed: {why}",
                    self.route.name, admin.user, admin.label
                ))
            })
    }

    /// Runs one command: the reply, or an error with [`LINK_FAILED`].
    async fn command(&self, s: &mut UpstreamStream, cmd: &[u8], what: &str) -> Result<Vec<u8>> {
        run(s, cmd, what).await.map_err(|e| {
            Error::unavailable(format!("route {:?}: {LINK_FAILED}: {e}", self.route.name))
        })
    }

    fn refused(&self, what: &str, reply: &[u8], password: &[u8]) -> Error {
        let text = reply_text(reply, &[password]);
        let hint = if text.contains("NOPERM") {
            format!(
                "; give the administrative user {:?} the permission, e.g. ACL SETUSER {} +acl +client|kill",
                self.route.user, self.route.user
            )
        } else {
            String::new()
        };
        Error::unavailable(format!(
            "route {:?}: {REFUSED}: {what} answered {text}{hint}",
            self.route.name
        ))
    }

    async fn create_user(&self, admin: &AdminLogin, row: &LeaseRow, password: &[u8]) -> Result<()> {
        check_name(&row.role)?;
        let cmd = set_user(&row.role, password, &self.rules)?;
        let mut s = self.admin(admin).await?;
        let reply = self.command(&mut s, &cmd, "ACL SETUSER").await;
        drop(cmd);
        let reply = reply?;
        if !reply.starts_with(b"+OK") {
            // A refused ACL SETUSER changes nothing; a user it created
            // anyway would be deleted here.
            let _ = self.delete(&mut s, &row.role).await;
            quit(&mut s).await;
            return Err(self.refused("ACL SETUSER", &reply, password));
        }
        quit(&mut s).await;
        Ok(())
    }

    /// `ACL DELUSER name` (ends the user's connections), then `CLIENT KILL
    /// USER name` for any left ("No such user" means none is).
    async fn delete(&self, s: &mut UpstreamStream, name: &str) -> Result<()> {
        let mut cmd = Vec::with_capacity(64);
        encode_command(
            &mut cmd,
            [&b"ACL"[..], b"DELUSER", name.as_bytes()].into_iter(),
        );
        let reply = self.command(s, &cmd, "ACL DELUSER").await?;
        if !reply.starts_with(b":") {
            return Err(self.refused("ACL DELUSER", &reply, &[]));
        }
        cmd.clear();
        encode_command(
            &mut cmd,
            [&b"CLIENT"[..], b"KILL", b"USER", name.as_bytes()].into_iter(),
        );
        let reply = self.command(s, &cmd, "CLIENT KILL USER").await?;
        let gone = reply.starts_with(b":")
            || reply.starts_with(b"+OK")
            || reply_text(&reply, &[]).contains("No such user");
        if !gone {
            return Err(self.refused("CLIENT KILL USER", &reply, &[]));
        }
        Ok(())
    }

    async fn drop_user(&self, admin: &AdminLogin, row: &LeaseRow) -> Result<()> {
        check_name(&row.role)?;
        let mut s = self.admin(admin).await?;
        let r = self.delete(&mut s, &row.role).await;
        quit(&mut s).await;
        r
    }
}

impl LeaseBackend for RedisLeases {
    fn create<'a>(
        &'a self,
        admin: &'a AdminLogin,
        row: &'a LeaseRow,
        password: &'a [u8],
    ) -> LeaseFuture<'a> {
        Box::pin(self.create_user(admin, row, password))
    }

    fn renew<'a>(
        &'a self,
        _admin: &'a AdminLogin,
        _row: &'a LeaseRow,
        _until: i64,
    ) -> LeaseFuture<'a> {
        // Redis users have no expiry time: warden deletes the user when
        // the lease ends.
        Box::pin(async { Ok(()) })
    }

    fn revoke<'a>(&'a self, admin: &'a AdminLogin, row: &'a LeaseRow) -> LeaseFuture<'a> {
        Box::pin(self.drop_user(admin, row))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn the_command_resets_the_user_and_adds_the_rules() {
        let rules = vec!["~app:*".to_string(), "(~x:* +get)".into()];
        let c = set_user("warden_web_0a1b2c3d", b"Ab9-_x", &rules).unwrap();
        assert_eq!(
            &c[..],
            &b"*8\r\n$3\r\nACL\r\n$7\r\nSETUSER\r\n$19\r\nwarden_web_0a1b2c3d\r\n$5\r\nreset\r\n$2\r\non\r\n$7\r\n>Ab9-_x\r\n$6\r\n~app:*\r\n$11\r\n(~x:* +get)\r\n"[..]
        );
        assert!(set_user("u", b"a b", &rules).is_err());
        assert!(check_name("x y").is_err() && check_name("").is_err());
        assert!(check_name("warden_web_0a1b2c3d").is_ok());
    }
}
