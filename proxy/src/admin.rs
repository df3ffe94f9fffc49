//! The admin API: JSON lines over a unix socket.
//!
//! One request per line, one response per line. Callers are identified by
//! SO_PEERCRED: root, the uid the daemon runs as, and (when `[admin] group` is
//! set) members of that group may connect; everyone else gets a `denied`
//! response and an audit record. Secret values cross the socket base64-encoded
//! inside zeroized buffers and are never logged.

use crate::access_monitor::{EventFeed, EventRecord};
use base64::Engine;
use serde::{Deserialize, Serialize};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::{Arc, Mutex};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};
use warden_core::audit::{Actor, ActorKind, Decision, Event, Target};
use warden_core::authority::{IdentityHandle, SvidInfo};
use warden_core::error::{Error, ErrorKind, Result};
use warden_core::metrics::Metrics;
use warden_core::paths;
use warden_core::service::{Caller, SecretService};
use zeroize::{Zeroize, Zeroizing};

/// Longest request line accepted (a 1 MiB value, base64-encoded, plus framing).
const MAX_LINE: u64 = 2 * 1024 * 1024;

#[derive(Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    Status,
    SecretPut {
        name: String,
        env: Option<String>,
        value_b64: Zeroizing<String>,
        /// Set by `warden import`: where the value was found (files, lines,
        /// scan rules; never the value), for the `secret.import` audit record.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        origin: Option<String>,
    },
    SecretList {
        env: Option<String>,
    },
    SecretVersions {
        name: String,
        env: Option<String>,
    },
    SecretRm {
        name: String,
        env: Option<String>,
    },
    SecretReveal {
        name: String,
        env: Option<String>,
        version: Option<u32>,
    },
    Unseal {
        share: Zeroizing<String>,
    },
    /// The current X.509-SVID of a workload (issued now if it has none).
    SvidShow {
        workload: String,
        #[serde(default)]
        pem: bool,
    },
    /// The trust bundle (PEM).
    SvidBundle,
    /// Access events from the eBPF monitor: the last `limit`, then (with
    /// `follow`) every new one. Answered as a stream of `Ok` lines, each with
    /// one event; without `follow` a final `Ok` with `{"end": true}`.
    Events {
        #[serde(default)]
        follow: bool,
        #[serde(default)]
        limit: Option<usize>,
    },
    /// Rotate a secret now (its `rotate` method); answered by the daemon.
    SecretRotate {
        name: String,
        env: Option<String>,
    },
    /// The dynamic-credential leases the daemon holds.
    LeaseList,
    /// Revoke one lease now (admin only, audited); answered by the daemon.
    LeaseRevoke {
        id: String,
    },
    /// Freeze a workload (admin only, audited).
    Freeze {
        workload: String,
        reason: String,
        #[serde(default)]
        for_secs: Option<u64>,
    },
    /// Lift a freeze (admin only, audited).
    Unfreeze {
        workload: String,
    },
    /// The frozen workloads.
    Frozen,
    /// A single-use join token for a new fleet node (admin only, audited).
    NodeToken {
        ttl_secs: u64,
    },
    /// The fleet's nodes.
    NodeList,
    /// Remove a node from the fleet (admin only, audited).
    NodeRemove {
        id: String,
    },
}

impl Request {
    /// The freeze verbs, or None.
    pub fn freeze_request(&self) -> Option<warden_core::freeze::FreezeRequest> {
        use warden_core::freeze::FreezeRequest;
        match self {
            Request::Freeze {
                workload,
                reason,
                for_secs,
            } => Some(FreezeRequest::Freeze {
                workload: workload.clone(),
                reason: reason.clone(),
                for_secs: *for_secs,
            }),
            Request::Unfreeze { workload } => Some(FreezeRequest::Unfreeze {
                workload: workload.clone(),
            }),
            Request::Frozen => Some(FreezeRequest::List),
            _ => None,
        }
    }

    /// Operation name for metrics and logs (never carries arguments).
    pub fn op(&self) -> &'static str {
        match self {
            Request::Status => "status",
            Request::SecretPut { .. } => "secret_put",
            Request::SecretList { .. } => "secret_list",
            Request::SecretVersions { .. } => "secret_versions",
            Request::SecretRm { .. } => "secret_rm",
            Request::SecretReveal { .. } => "secret_reveal",
            Request::Unseal { .. } => "unseal",
            Request::SvidShow { .. } => "svid_show",
            Request::SvidBundle => "svid_bundle",
            Request::Events { .. } => "events",
            Request::SecretRotate { .. } => "secret_rotate",
            Request::LeaseList => "lease_list",
            Request::LeaseRevoke { .. } => "lease_revoke",
            Request::Freeze { .. } => "freeze",
            Request::Unfreeze { .. } => "unfreeze",
            Request::Frozen => "frozen",
            Request::NodeToken { .. } => "node_token",
            Request::NodeList => "node_list",
            Request::NodeRemove { .. } => "node_remove",
        }
    }
}

#[derive(Serialize, Deserialize)]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum Response {
    Ok {
        result: serde_json::Value,
    },
    Revealed {
        version: u32,
        value_b64: Zeroizing<String>,
    },
    /// A new join token (its text in a zeroized buffer, like a revealed value).
    JoinToken {
        id: String,
        expires_at: String,
        carries_key: bool,
        token: Zeroizing<String>,
    },
    Error {
        kind: ErrorKind,
        message: String,
    },
}

impl Response {
    fn from_result<T: Serialize>(r: Result<T>) -> Response {
        match r.and_then(|v| {
            serde_json::to_value(v).map_err(|e| Error::internal(format!("encoding response: {e}")))
        }) {
            Ok(result) => Response::Ok { result },
            Err(e) => Response::Error {
                kind: e.kind,
                message: e.message,
            },
        }
    }

    /// The `Ok` payload decoded as `T`, or the remote error.
    pub fn into_result<T: serde::de::DeserializeOwned>(self) -> Result<T> {
        match self {
            Response::Ok { result } => serde_json::from_value(result)
                .map_err(|e| Error::internal(format!("unexpected response from daemon: {e}"))),
            Response::Error { kind, message } => Err(Error::new(kind, message)),
            Response::Revealed { .. } | Response::JoinToken { .. } => {
                Err(Error::internal("unexpected value in daemon response"))
            }
        }
    }
}

/// Who may connect.
#[derive(Debug, Clone)]
pub struct AdminAccess {
    pub daemon_uid: u32,
    pub group: Option<(String, u32)>,
}

impl AdminAccess {
    fn admits(&self, uid: u32, gid: u32, pid: Option<u32>) -> bool {
        if uid == 0 || uid == self.daemon_uid {
            return true;
        }
        match &self.group {
            Some((_, g)) => gid == *g || pid.is_some_and(|p| paths::process_groups(p).contains(g)),
            None => false,
        }
    }
}

/// Binds the admin socket: removes a stale socket file, refuses to steal a live
/// one, sets mode 0600 (0660 and the group when configured).
pub fn bind_socket(path: &Path, access: &AdminAccess) -> Result<UnixListener> {
    if let Some(parent) = path.parent() {
        if !parent.exists() {
            std::fs::create_dir_all(parent)
                .map_err(|e| Error::io("cannot create admin socket dir", parent, &e))?;
            // Traversable: the socket file's own mode guards it, and the
            // Workload API socket may share this directory.
            let mode = 0o755;
            std::fs::set_permissions(parent, std::fs::Permissions::from_mode(mode))
                .map_err(|e| Error::io("cannot chmod", parent, &e))?;
        }
    }
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(Error::unavailable(format!(
                "admin socket {} is in use by a running warden daemon",
                path.display()
            )));
        }
        std::fs::remove_file(path)
            .map_err(|e| Error::io("cannot remove stale socket", path, &e))?;
    }
    let listener =
        UnixListener::bind(path).map_err(|e| Error::io("cannot bind admin socket", path, &e))?;
    let mode = if access.group.is_some() { 0o660 } else { 0o600 };
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .map_err(|e| Error::io("cannot chmod admin socket", path, &e))?;
    if let Some((_, gid)) = &access.group {
        std::os::unix::fs::chown(path, None, Some(*gid))
            .map_err(|e| Error::io("cannot chown admin socket", path, &e))?;
    }
    Ok(listener)
}

/// The daemon's asynchronous services behind some requests (rotation, leases).
#[derive(Clone)]
pub struct Engines {
    pub rotator: Arc<warden_core::rotation::Rotator>,
    pub leases: Arc<warden_core::leases::LeaseManager>,
    /// The eBPF monitor's access feed (`warden events`).
    pub events: Arc<EventFeed>,
    /// The workload freezer (freeze/unfreeze/frozen).
    pub freezer: Option<Arc<warden_core::freeze::Freezer>>,
}

/// Requests that need network I/O run here, outside the service lock.
async fn dispatch_async(engines: &Engines, caller: &Caller, req: &Request) -> Option<Response> {
    match req {
        Request::SecretRotate { name, env } => Some(Response::from_result(
            engines
                .rotator
                .rotate(
                    name,
                    env.as_deref(),
                    caller_actor(caller),
                    "requested by an admin (`warden secret rotate`)",
                )
                .await,
        )),
        Request::LeaseList => Some(Response::from_result(Ok(engines.leases.list()))),
        Request::LeaseRevoke { id } if !caller.is_admin => Some(Response::Error {
            kind: ErrorKind::Denied,
            message: format!(
                "uid {} may not revoke leases: only root or the daemon's uid may (lease {id})",
                caller.uid
            ),
        }),
        Request::LeaseRevoke { id } => Some(Response::from_result(
            engines.leases.revoke(id, caller_actor(caller)).await,
        )),
        _ => None,
    }
}

/// Accepts admin connections until the task is dropped.
pub async fn serve(
    listener: UnixListener,
    service: Arc<Mutex<SecretService>>,
    identity: Arc<IdentityHandle>,
    metrics: Metrics,
    access: AdminAccess,
    engines: Engines,
) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            continue;
        };
        let (service, identity, metrics, access, engines) = (
            service.clone(),
            identity.clone(),
            metrics.clone(),
            access.clone(),
            engines.clone(),
        );
        tokio::spawn(async move {
            if let Err(e) =
                handle_connection(stream, service, identity, metrics, access, engines).await
            {
                tracing::debug!("admin connection ended: {e}");
            }
        });
    }
}

async fn handle_connection(
    stream: UnixStream,
    service: Arc<Mutex<SecretService>>,
    identity: Arc<IdentityHandle>,
    metrics: Metrics,
    access: AdminAccess,
    engines: Engines,
) -> std::io::Result<()> {
    let (events, freezer) = (engines.events.clone(), engines.freezer.clone());
    let cred = stream.peer_cred()?;
    let pid = cred.pid().and_then(|p| u32::try_from(p).ok());
    let caller = Caller {
        uid: cred.uid(),
        pid,
        is_admin: cred.uid() == 0 || cred.uid() == access.daemon_uid,
    };
    let (read, mut write) = stream.into_split();
    if !access.admits(cred.uid(), cred.gid(), pid) {
        tracing::warn!(uid = cred.uid(), pid = ?pid, "admin connection refused");
        metrics.admin_request("connect", "denied");
        let svc = service.clone();
        let who = caller.clone();
        let _ = tokio::task::spawn_blocking(move || {
            if let Ok(mut s) = svc.lock() {
                let _ = s.record(&Event {
                    actor: caller_actor(&who),
                    action: "admin.connect".into(),
                    target: Target::default(),
                    decision: Decision::Deny,
                    reason: "caller is not root, the daemon's uid, or in the admin group".into(),
                });
            }
        })
        .await;
        let resp = Response::Error {
            kind: ErrorKind::Denied,
            message: format!(
                "uid {} may not use the warden admin socket: connect as root, as uid {}{}",
                cred.uid(),
                access.daemon_uid,
                match &access.group {
                    Some((g, _)) => format!(", or as a member of group {g:?}"),
                    None => " (or set [admin] group in the config)".into(),
                }
            ),
        };
        write_response(&mut write, &resp).await?;
        return Ok(());
    }
    let mut reader = tokio::io::BufReader::new(read);
    loop {
        let mut line = Zeroizing::new(Vec::new());
        let n = (&mut reader)
            .take(MAX_LINE + 1)
            .read_until(b'\n', &mut line)
            .await?;
        if n == 0 {
            return Ok(());
        }
        if n as u64 > MAX_LINE {
            let resp = Response::Error {
                kind: ErrorKind::Usage,
                message: format!("request larger than {MAX_LINE} bytes"),
            };
            write_response(&mut write, &resp).await?;
            return Ok(());
        }
        let resp = match serde_json::from_slice::<Request>(&line) {
            Err(e) => {
                metrics.admin_request("invalid", "usage");
                Response::Error {
                    kind: ErrorKind::Usage,
                    message: format!("malformed admin request: {e}"),
                }
            }
            Ok(Request::Events { follow, limit }) => {
                metrics.admin_request("events", "ok");
                line.zeroize();
                return stream_events(&mut write, &events, follow, limit).await;
            }
            Ok(req) if req.freeze_request().is_some() && freezer.is_some() => {
                let op = req.op();
                let (fr, who) = (freezer.clone(), caller.clone());
                let resp = tokio::task::spawn_blocking(move || match (fr, req.freeze_request()) {
                    (Some(f), Some(r)) => Response::from_result(f.admin(&who, r)),
                    _ => Response::Error {
                        kind: ErrorKind::Internal,
                        message: "freeze request lost".into(),
                    },
                })
                .await
                .unwrap_or_else(|e| Response::Error {
                    kind: ErrorKind::Internal,
                    message: format!("request handler failed: {e}"),
                });
                let result = match &resp {
                    Response::Error { kind, .. } => format!("{kind:?}").to_lowercase(),
                    _ => "ok".into(),
                };
                metrics.admin_request(op, &result);
                resp
            }
            Ok(req) => {
                let op = req.op();
                if let Some(resp) = dispatch_async(&engines, &caller, &req).await {
                    let result = match &resp {
                        Response::Error { kind, .. } => format!("{kind:?}").to_lowercase(),
                        _ => "ok".into(),
                    };
                    metrics.admin_request(op, &result);
                    line.zeroize();
                    write_response(&mut write, &resp).await?;
                    continue;
                }
                let svc = service.clone();
                let ident = identity.clone();
                let who = caller.clone();
                let resp =
                    tokio::task::spawn_blocking(move || dispatch_locked(&svc, &ident, &who, req))
                        .await
                        .unwrap_or_else(|e| Response::Error {
                            kind: ErrorKind::Internal,
                            message: format!("request handler failed: {e}"),
                        });
                let result = match &resp {
                    Response::Error { kind, .. } => format!("{kind:?}").to_lowercase(),
                    _ => "ok".into(),
                };
                metrics.admin_request(op, &result);
                resp
            }
        };
        line.zeroize();
        write_response(&mut write, &resp).await?;
    }
}

/// Writes recent events, then live ones until the client goes away.
async fn stream_events(
    w: &mut tokio::net::unix::OwnedWriteHalf,
    feed: &EventFeed,
    follow: bool,
    limit: Option<usize>,
) -> std::io::Result<()> {
    let mut live = follow.then(|| feed.subscribe());
    for e in feed.recent(limit.unwrap_or(crate::access_monitor::RECENT_EVENTS)) {
        write_event(w, &e).await?;
    }
    let Some(live) = live.as_mut() else {
        let end = Response::Ok {
            result: serde_json::json!({ "end": true }),
        };
        return write_response(w, &end).await;
    };
    loop {
        match live.recv().await {
            Ok(e) => write_event(w, &e.record()).await?,
            Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                let note = Response::Ok {
                    result: serde_json::json!({ "skipped": n }),
                };
                write_response(w, &note).await?;
            }
            Err(tokio::sync::broadcast::error::RecvError::Closed) => return Ok(()),
        }
    }
}

async fn write_event(
    w: &mut tokio::net::unix::OwnedWriteHalf,
    e: &EventRecord,
) -> std::io::Result<()> {
    let resp = Response::Ok {
        result: serde_json::to_value(e).map_err(std::io::Error::other)?,
    };
    write_response(w, &resp).await
}

async fn write_response(
    w: &mut tokio::net::unix::OwnedWriteHalf,
    resp: &Response,
) -> std::io::Result<()> {
    let mut bytes = Zeroizing::new(serde_json::to_vec(resp).map_err(std::io::Error::other)?);
    bytes.push(b'\n');
    w.write_all(&bytes).await?;
    w.flush().await
}

fn dispatch_locked(
    service: &Mutex<SecretService>,
    identity: &IdentityHandle,
    caller: &Caller,
    req: Request,
) -> Response {
    match service.lock() {
        Ok(mut s) => dispatch(&mut s, Some(identity), caller, req),
        Err(_) => Response::Error {
            kind: ErrorKind::Internal,
            message: "service state is poisoned after an earlier failure; restart warden".into(),
        },
    }
}

/// Executes one request against the service. The daemon calls this for socket
/// requests; the CLI calls it directly when it works offline, so both paths
/// share every check and audit record.
pub fn dispatch(
    s: &mut SecretService,
    identity: Option<&IdentityHandle>,
    caller: &Caller,
    req: Request,
) -> Response {
    match req {
        Request::Status => Response::from_result(s.status()),
        Request::SecretPut {
            name,
            env,
            value_b64,
            origin,
        } => {
            let value = match base64::engine::general_purpose::STANDARD.decode(value_b64.as_bytes())
            {
                Ok(v) => Zeroizing::new(v),
                Err(_) => {
                    return Response::Error {
                        kind: ErrorKind::Usage,
                        message: "value_b64 is not valid base64".into(),
                    }
                }
            };
            Response::from_result(s.put_from(
                caller,
                &name,
                env.as_deref(),
                &value,
                origin.as_deref(),
            ))
        }
        Request::SecretList { env } => Response::from_result(s.list(caller, env.as_deref())),
        Request::SecretVersions { name, env } => {
            Response::from_result(s.versions(caller, &name, env.as_deref()))
        }
        Request::SecretRm { name, env } => {
            Response::from_result(s.remove(caller, &name, env.as_deref()))
        }
        Request::SecretReveal { name, env, version } => {
            match s.reveal(caller, &name, env.as_deref(), version) {
                Ok((version, value)) => Response::Revealed {
                    version,
                    value_b64: Zeroizing::new(
                        base64::engine::general_purpose::STANDARD.encode(&*value),
                    ),
                },
                Err(e) => Response::Error {
                    kind: e.kind,
                    message: e.message,
                },
            }
        }
        Request::Unseal { share } => Response::from_result(s.unseal(caller, &share)),
        Request::SvidShow { workload, pem } => {
            Response::from_result(svid_show(s, identity, caller, &workload, pem))
        }
        Request::SvidBundle => Response::from_result(s.bundle_pem()),
        Request::NodeToken { ttl_secs } => {
            match s.node_token(caller, std::time::Duration::from_secs(ttl_secs)) {
                Ok(t) => Response::JoinToken {
                    id: t.id,
                    expires_at: t.expires_at,
                    carries_key: t.carries_key,
                    token: t.text,
                },
                Err(e) => Response::Error {
                    kind: e.kind,
                    message: e.message,
                },
            }
        }
        Request::NodeList => Response::from_result(s.node_list(caller)),
        Request::NodeRemove { id } => Response::from_result(s.node_remove(caller, &id)),
        // Streamed by the daemon's connection handler; offline there is no
        // monitor to ask.
        // The daemon handles these with its Freezer; the offline CLI calls
        // `freeze::admin_offline` with the configured workloads.
        Request::Freeze { .. } | Request::Unfreeze { .. } | Request::Frozen => Response::Error {
            kind: ErrorKind::Unavailable,
            message: "freezing is handled by the daemon's freezer or the offline CLI".into(),
        },
        Request::Events { .. } => Response::Error {
            kind: ErrorKind::Unavailable,
            message:
                "access events come from the running daemon's eBPF monitor: start `warden up` first"
                    .into(),
        },
        Request::SecretRotate { .. } | Request::LeaseList | Request::LeaseRevoke { .. } => {
            Response::Error {
                kind: ErrorKind::Unavailable,
                message: "this request is answered by the daemon: start `warden up` first".into(),
            }
        }
    }
}

fn svid_show(
    s: &mut SecretService,
    identity: Option<&IdentityHandle>,
    caller: &Caller,
    workload: &str,
    pem: bool,
) -> Result<SvidInfo> {
    let identity = identity.ok_or_else(|| {
        Error::unavailable("SVIDs are issued by the daemon: start `warden up` first")
    })?;
    let spiffe_id = identity.spiffe_id_of(workload)?.to_string();
    let mut guard = identity
        .authority
        .lock()
        .map_err(|_| Error::internal("identity state poisoned"))?;
    let authority = guard.as_mut().ok_or_else(|| {
        if s.is_sealed() {
            Error::sealed("warden is sealed: the CA key is not available until `warden unseal`")
        } else {
            Error::unavailable("the CA is still loading; try again in a second")
        }
    })?;
    let (svid, fresh) =
        authority.svid_for(workload, &spiffe_id, time::OffsetDateTime::now_utc())?;
    if fresh {
        identity.wake.notify_one();
        if let Some(m) = s.metrics() {
            m.svid_issued();
        }
        s.record(&Event {
            actor: caller_actor(caller),
            action: "svid.issue".into(),
            target: Target {
                detail: Some(format!("{workload} {spiffe_id} serial {}", svid.serial_hex)),
                ..Target::default()
            },
            decision: Decision::Allow,
            reason: "requested by an admin (`warden svid show`)".into(),
        })?;
    }
    let mut info = authority
        .info(workload)
        .ok_or_else(|| Error::internal("issued SVID vanished"))?;
    if !pem {
        info.chain_pem.clear();
    }
    Ok(info)
}

pub fn caller_actor(caller: &Caller) -> Actor {
    Actor {
        kind: ActorKind::Admin,
        uid: Some(caller.uid),
        user: paths::user_name(caller.uid),
        pid: caller.pid,
        exe: None,
        workload: None,
    }
}

/// Synchronous client used by the CLI.
pub struct AdminClient {
    reader: BufReader<std::os::unix::net::UnixStream>,
    writer: std::os::unix::net::UnixStream,
}

impl AdminClient {
    /// Connects to the daemon. `Ok(None)` when no daemon listens there (no
    /// socket file, or a stale one); an error when one exists but refuses us.
    pub fn connect(path: &Path) -> Result<Option<AdminClient>> {
        match std::os::unix::net::UnixStream::connect(path) {
            Ok(s) => {
                let timeout = Some(std::time::Duration::from_secs(60));
                let _ = s.set_read_timeout(timeout);
                let _ = s.set_write_timeout(timeout);
                let writer = s
                    .try_clone()
                    .map_err(|e| Error::io("admin socket", path, &e))?;
                Ok(Some(AdminClient {
                    reader: BufReader::new(s),
                    writer,
                }))
            }
            Err(e) => match e.kind() {
                std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused => Ok(None),
                std::io::ErrorKind::PermissionDenied => Err(Error::denied(format!(
                    "cannot connect to the warden admin socket {}: permission denied (run as root, as the warden user, or as a member of the [admin] group)",
                    path.display()
                ))),
                _ => Err(Error::io("cannot connect to admin socket", path, &e)),
            },
        }
    }

    /// Sends `req` and hands every response line to `each` until it returns
    /// false or the daemon closes the connection (streamed requests).
    pub fn stream(
        &mut self,
        req: &Request,
        mut each: impl FnMut(Response) -> Result<bool>,
    ) -> Result<()> {
        let mut line = serde_json::to_vec(req)
            .map_err(|e| Error::internal(format!("encoding request: {e}")))?;
        line.push(b'\n');
        self.writer
            .write_all(&line)
            .map_err(|e| Error::unavailable(format!("admin socket write failed: {e}")))?;
        let _ = self.reader.get_ref().set_read_timeout(None);
        loop {
            let mut resp = String::new();
            let n = self
                .reader
                .read_line(&mut resp)
                .map_err(|e| Error::unavailable(format!("admin socket read failed: {e}")))?;
            if n == 0 {
                return Ok(());
            }
            let resp: Response = serde_json::from_str(&resp)
                .map_err(|e| Error::internal(format!("malformed response from daemon: {e}")))?;
            if !each(resp)? {
                return Ok(());
            }
        }
    }

    pub fn call(&mut self, req: &Request) -> Result<Response> {
        let mut line = Zeroizing::new(
            serde_json::to_vec(req)
                .map_err(|e| Error::internal(format!("encoding request: {e}")))?,
        );
        line.push(b'\n');
        // A daemon that refuses the connection (SO_PEERCRED) answers and
        // closes at once, maybe before the request is written: its answer
        // is still read, and only without one does the write error count.
        let wrote = self.writer.write_all(&line);
        let mut resp = Zeroizing::new(String::new());
        let n = match self.reader.read_line(&mut resp) {
            Ok(n) => n,
            Err(e) => {
                return Err(match wrote {
                    Err(w) => Error::unavailable(format!("admin socket write failed: {w}")),
                    Ok(()) => Error::unavailable(format!("admin socket read failed: {e}")),
                })
            }
        };
        if n == 0 {
            return Err(match wrote {
                Err(w) => Error::unavailable(format!("admin socket write failed: {w}")),
                Ok(()) => Error::unavailable("the daemon closed the admin connection"),
            });
        }
        serde_json::from_str(&resp)
            .map_err(|e| Error::internal(format!("malformed response from daemon: {e}")))
    }
}
