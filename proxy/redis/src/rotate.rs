//! `rotate = { method = "redis", route = "…" }`: warden logs in to the
//! route's server as the route's user (`AUTH [user] current`) and runs
//! `ACL SETUSER <user> >new <current>`: the new password is added and the
//! current one removed in one command (atomic on Redis 7), so passwords
//! the user has besides warden's are left alone. Without `credential.user`
//! the user is `default` (the `requirepass` password). The user needs the
//! `acl|setuser` command (deny `ACL` to the route's clients with
//! `deny_commands`: warden's own connection is not subject to it).
//!
//! `ACL SETUSER` changes the server's memory only. warden then persists
//! it: `ACL SAVE` when the server uses an ACL file, else `CONFIG REWRITE`
//! (users defined in redis.conf). When neither works (no permission, no
//! file) the rotation still counts — the server accepts only the new
//! password — and a warning says that a restart of the server would bring
//! the old one back. Server errors are scrubbed of both passwords (Redis
//! echoes an `ACL SETUSER` argument it refuses).

use crate::resp::encode_command;
use crate::{login, read_reply, RedisRoute, UpstreamFailure};
use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::time::Duration;
use tokio::io::AsyncWriteExt;
use warden_core::admission::withhold_secret;
use warden_core::config::Config;
use warden_core::error::Result;
use warden_core::pgwire::upstream::UpstreamStream;
use warden_core::rotation::{Apply, PasswordChanger};
use zeroize::Zeroizing;

/// Longest an administration command may take.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(30);

/// The redis rotation method: the routes' upstreams and users.
pub struct RedisRotation {
    routes: HashMap<String, RedisRoute>,
}

type Fut<'a> = Pin<Box<dyn Future<Output = std::result::Result<(), Apply>> + Send + 'a>>;

impl RedisRotation {
    pub fn from_config(cfg: &Config) -> Result<RedisRotation> {
        Ok(RedisRotation {
            routes: RedisRoute::from_config(cfg)?
                .into_iter()
                .map(|r| (r.name.clone(), r))
                .collect(),
        })
    }

    fn route(&self, name: &str) -> std::result::Result<&RedisRoute, Apply> {
        self.routes
            .get(name)
            .ok_or_else(|| Apply::Unchanged(format!("there is no redis route {name:?}")))
    }
}

fn describe(f: UpstreamFailure) -> String {
    match f {
        UpstreamFailure::Unreachable(m) | UpstreamFailure::Rejected(m) => m,
    }
}

/// The ACL user whose password the route logs in with.
fn acl_user(route: &RedisRoute) -> &str {
    if route.user.is_empty() {
        "default"
    } else {
        &route.user
    }
}

/// `ACL SETUSER user >new <current` (zeroized with its buffer).
fn set_user(user: &str, current: &[u8], new: &[u8]) -> Zeroizing<Vec<u8>> {
    let mut add = Zeroizing::new(Vec::with_capacity(1 + new.len()));
    add.push(b'>');
    add.extend_from_slice(new);
    let mut remove = Zeroizing::new(Vec::with_capacity(1 + current.len()));
    remove.push(b'<');
    remove.extend_from_slice(current);
    let mut out = Zeroizing::new(Vec::with_capacity(64 + add.len() + remove.len()));
    encode_command(
        &mut out,
        [&b"ACL"[..], b"SETUSER", user.as_bytes(), &add, &remove].into_iter(),
    );
    out
}

/// Sends one command and reads its reply (bounded in time).
pub(crate) async fn run(
    stream: &mut UpstreamStream,
    command: &[u8],
    what: &str,
) -> std::result::Result<Vec<u8>, String> {
    let fut = async {
        stream
            .write_all(command)
            .await
            .map_err(|e| format!("sending {what}: {e}"))?;
        read_reply(stream, what).await
    };
    match tokio::time::timeout(COMMAND_TIMEOUT, fut).await {
        Ok(r) => r,
        Err(_) => Err(format!(
            "no answer to {what} within {} s",
            COMMAND_TIMEOUT.as_secs()
        )),
    }
}

/// A reply as one printable line, never quoting `secrets`.
pub(crate) fn reply_text(reply: &[u8], secrets: &[&[u8]]) -> String {
    let line = reply.split(|b| *b == b'\r').next().unwrap_or_default();
    let mut text: String = String::from_utf8_lossy(line)
        .chars()
        .map(|c| if c.is_control() { '?' } else { c })
        .collect();
    for s in secrets {
        withhold_secret(&mut text, s);
    }
    text
}

/// Writes the server's ACL to disk: `ACL SAVE`, or `CONFIG REWRITE` when
/// the server has no ACL file. Err: why neither worked.
async fn persist(stream: &mut UpstreamStream) -> std::result::Result<&'static str, String> {
    let mut cmd = Vec::with_capacity(32);
    encode_command(&mut cmd, [&b"ACL"[..], b"SAVE"].into_iter());
    let reply = run(stream, &cmd, "ACL SAVE").await?;
    if reply.starts_with(b"+OK") {
        return Ok("ACL SAVE");
    }
    let acl_save = reply_text(&reply, &[]);
    cmd.clear();
    encode_command(&mut cmd, [&b"CONFIG"[..], b"REWRITE"].into_iter());
    let reply = run(stream, &cmd, "CONFIG REWRITE").await?;
    if reply.starts_with(b"+OK") {
        return Ok("CONFIG REWRITE");
    }
    Err(format!(
        "ACL SAVE answered {acl_save}; CONFIG REWRITE answered {}",
        reply_text(&reply, &[])
    ))
}

pub(crate) async fn quit(stream: &mut UpstreamStream) {
    let mut cmd = Vec::with_capacity(16);
    encode_command(&mut cmd, [&b"QUIT"[..]].into_iter());
    let _ = tokio::time::timeout(Duration::from_secs(1), stream.write_all(&cmd)).await;
}

impl PasswordChanger for RedisRotation {
    fn change<'a>(&'a self, route: &'a str, current: &'a [u8], new: &'a [u8]) -> Fut<'a> {
        Box::pin(async move {
            let r = self.route(route)?;
            let user = acl_user(r);
            let mut logged = login(r, current).await.map_err(|f| {
                // No session, no ACL SETUSER: nothing changed.
                Apply::Unchanged(format!(
                    "route {route:?}: login as {user:?} with the current password failed: {}",
                    describe(f)
                ))
            })?;
            if new.is_empty() {
                return Err(Apply::Unchanged("the new value is empty".into()));
            }
            let cmd = set_user(user, current, new);
            let reply = run(&mut logged.stream, &cmd, "ACL SETUSER").await;
            drop(cmd);
            let reply = reply.map_err(Apply::Unknown)?;
            if reply.first() == Some(&b'-') {
                return Err(Apply::Unchanged(format!(
                    "ACL SETUSER {user:?} refused: {}",
                    reply_text(&reply, &[current, new])
                )));
            }
            if !reply.starts_with(b"+OK") {
                return Err(Apply::Unknown(format!(
                    "an unexpected answer to ACL SETUSER: {}",
                    reply_text(&reply, &[current, new])
                )));
            }
            match persist(&mut logged.stream).await {
                Ok(how) => {
                    tracing::info!(route = %route, "redis user {user:?}: new password saved with {how}")
                }
                Err(why) => tracing::warn!(
                    route = %route,
                    "redis user {user:?}: the new password is in the server's memory only, so a restart of the server would bring back the old one ({why}); give the user acl|save or config|rewrite, or save the ACL yourself"
                ),
            }
            quit(&mut logged.stream).await;
            Ok(())
        })
    }

    fn probe<'a>(&'a self, route: &'a str, password: &'a [u8]) -> Fut<'a> {
        Box::pin(async move {
            let r = self.route(route)?;
            match login(r, password).await {
                Ok(mut logged) => {
                    quit(&mut logged.stream).await;
                    Ok(())
                }
                Err(UpstreamFailure::Rejected(m)) => Err(Apply::Unchanged(m)),
                Err(f) => Err(Apply::Unknown(describe(f))),
            }
        })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn the_command_adds_the_new_password_and_removes_the_current_one() {
        let c = set_user("app", b"old", b"new");
        assert_eq!(
            &c[..],
            b"*5\r\n$3\r\nACL\r\n$7\r\nSETUSER\r\n$3\r\napp\r\n$4\r\n>new\r\n$4\r\n<old\r\n"
        );
    }

    #[test]
    fn replies_never_quote_a_password() {
        let r = b"-ERR Error in ACL SETUSER modifier '<hunter2': no such password\r\n";
        let t = reply_text(r, &[b"hunter2", b"n3w"]);
        assert!(!t.contains("hunter2"), "{t}");
        assert_eq!(reply_text(b"-ERR no\r\n", &[b"x"]), "-ERR no");
    }
}
