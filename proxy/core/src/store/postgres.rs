//! PostgreSQL backend of the secret store (`[store] backend = "postgres"`): one
//! database that several warden nodes share. It holds what the SQLite file
//! holds — sealed rows (opaque bytes from [`super::SecretStore`]), metadata and
//! lease rows — so a dump of it is as useless without the master key as a
//! stolen `store.db`.
//!
//! **One connection, on its own thread.** The trait is synchronous and every
//! call already runs under the secret service's lock, so a pool would add
//! nothing: the backend keeps one connection and reconnects it on the next
//! call after it broke (never inside a transaction: that fails and rolls
//! back). The connection lives on a thread of its own and calls are handed to
//! it over a channel, because the sync client runs a small tokio runtime of
//! its own, which must not be entered from a thread that is already inside one
//! (a PostgreSQL session shard writes lease rows in place).
//!
//! **Durable when a method returns**: every write is one transaction and the
//! session runs with `synchronous_commit` at least `on`.
//!
//! **Schema migrations** are ordered SQL strings ([`MIGRATIONS`]), recorded in
//! `warden_schema`, applied in one transaction under
//! `pg_advisory_xact_lock(MIGRATION_LOCK)`: nodes starting together apply each
//! migration once, and the others find it done. A store migrated by a newer
//! warden is refused, not used.
//!
//! **Lease rows belong to a node** (`leases.node`, the host name and data
//! dir): a lease's password lives only in the memory of its process, so a node
//! lists, sweeps and deletes only its own rows.
//!
//! **Every change is announced** (see [`crate::propagation`]): a write of a
//! secret or a meta key bumps the one-row `change_counter` and sends
//! `NOTIFY warden_changes` with `<counter>:<kind>:<what>` (a name, never a
//! value) in its own transaction, so other nodes hear of it exactly when it
//! commits, and a node that missed notifications sees the counter moved.
//!
//! **Claims** (`claims` table, one row per job with its node and expiry) let
//! exactly one node run a scheduled job such as a rotation; a claim of a node
//! that died lapses at its expiry.

use super::{
    CommitHook, LeaseRow, RewrapFn, SealedVersion, SecretBackend, SecretSummary, VersionInfo,
    VersionRow, WrappedKeyRow,
};
use crate::config::{parse_store_url, Store as StoreConfig, StoreTarget, StoreTls};
use crate::error::{Error, Result};
use postgres::types::ToSql;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::{ClientConfig, RootCertStore};
use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::str::FromStr;
use std::sync::{mpsc, Arc};
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_postgres::tls::{ChannelBinding, MakeTlsConnect, TlsConnect, TlsStream};
use tokio_postgres::Socket;
use zeroize::Zeroizing;

/// Key of the advisory lock that serialises migrations ("wardenS1").
pub const MIGRATION_LOCK: i64 = 0x7761_7264_656e_5331;

/// The schema, one migration per version: `MIGRATIONS[i]` takes version `i`
/// to `i + 1`. Append only; never edit an applied one.
pub const MIGRATIONS: &[&str] = &[
    // 1: the tables of the SQLite store, plus the owning node of a lease row.
    "CREATE TABLE meta (
         key   text PRIMARY KEY,
         value text NOT NULL
     );
     CREATE TABLE secrets (
         name         text NOT NULL,
         env          text NOT NULL,
         next_version bigint NOT NULL,
         updated_at   text NOT NULL,
         PRIMARY KEY (name, env)
     );
     CREATE TABLE secret_versions (
         name        text NOT NULL,
         env         text NOT NULL,
         version     bigint NOT NULL,
         created_at  text NOT NULL,
         created_by  text NOT NULL,
         kek_id      text NOT NULL,
         wrapped_key bytea NOT NULL,
         ciphertext  bytea NOT NULL,
         PRIMARY KEY (name, env, version),
         FOREIGN KEY (name, env) REFERENCES secrets (name, env)
     );
     CREATE TABLE leases (
         id             text PRIMARY KEY,
         node           text NOT NULL,
         route          text NOT NULL,
         workload       text NOT NULL,
         role           text NOT NULL,
         state          text NOT NULL,
         owner_pid      bigint NOT NULL,
         created_at     bigint NOT NULL,
         expires_at     bigint NOT NULL,
         max_expires_at bigint NOT NULL
     );
     CREATE INDEX leases_by_node ON leases (node, created_at);",
    // 2: fleet propagation and claims. `change_counter` moves with every
    // announced change (transactional, unlike a sequence: a reader never sees
    // a change counted before it commits); `claims` holds who runs a job.
    "CREATE TABLE change_counter (
         id    integer PRIMARY KEY CHECK (id = 1),
         value bigint NOT NULL
     );
     INSERT INTO change_counter (id, value) VALUES (1, 0);
     CREATE TABLE claims (
         job        text PRIMARY KEY,
         node       text NOT NULL,
         expires_at timestamptz NOT NULL
     );",
    // 3: fleet views (see `crate::fleet_views`). `audit_records` is a copy of
    // every node's audit log: one row per record, the line exactly as the
    // node wrote it (so its hash chain verifies here), keyed by the node, the
    // log (the hash of its first record: a node whose data dir was recreated
    // starts a new chain) and the record's seq. `access_events` is a bounded
    // summary of recent access events (pruned by each node); `freeze_acks`
    // says which node applied which freeze (its time, who and why, hashed).
    "CREATE TABLE audit_records (
         node       text NOT NULL,
         log        text NOT NULL,
         seq        bigint NOT NULL,
         at         timestamptz NOT NULL,
         hash       text NOT NULL,
         line       text NOT NULL,
         shipped_at timestamptz NOT NULL DEFAULT now(),
         PRIMARY KEY (node, log, seq)
     );
     CREATE INDEX audit_records_by_time ON audit_records (at);
     CREATE INDEX audit_records_by_shipped ON audit_records (shipped_at);
     CREATE TABLE access_events (
         id    bigserial PRIMARY KEY,
         node  text NOT NULL,
         at    timestamptz NOT NULL,
         event text NOT NULL
     );
     CREATE INDEX access_events_by_node ON access_events (node, id);
     CREATE INDEX access_events_by_time ON access_events (at);
     CREATE TABLE freeze_acks (
         workload   text NOT NULL,
         node       text NOT NULL,
         freeze_id  text NOT NULL,
         applied_at text NOT NULL,
         PRIMARY KEY (workload, node)
     );",
];

/// The channel every change is announced on.
pub const CHANGES_CHANNEL: &str = "warden_changes";

/// Bumps the change counter and announces `$1` (`<kind>:<what>`) as
/// `<counter>:<kind>:<what>`; delivered when the transaction commits.
const ANNOUNCE: &str = "WITH bumped AS (
         UPDATE change_counter SET value = value + 1 WHERE id = 1 RETURNING value
     )
     SELECT pg_notify('warden_changes', bumped.value::text || ':' || $1) FROM bumped";

/// The change counter's current value.
pub const READ_COUNTER: &str = "SELECT value FROM change_counter WHERE id = 1";

/// First key of the advisory locks that serialise read-modify-write updates
/// of one meta key (`meta_update`), the second being `hashtext(key)`.
const META_LOCK_CLASS: i32 = 0x7764_6d31;

/// The schema version this warden writes and reads.
pub const SCHEMA_VERSION: i32 = MIGRATIONS.len() as i32;

/// How long a connection attempt may take when `store.url` sets no
/// `connect_timeout`.
const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// A statement that runs longer fails (a lock held by a stuck node, a
/// server in trouble) instead of holding the secret service's lock forever.
const STATEMENT_TIMEOUT: &str = "60s";
/// Unacknowledged data or a silent peer ends the connection after this long.
const DEAD_PEER_TIMEOUT: Duration = Duration::from_secs(30);

/// Everything needed to reach the store: the parsed URL with the password
/// from its file, and the TLS client configuration.
pub struct PostgresSettings {
    config: postgres::Config,
    tls: Option<Arc<ClientConfig>>,
    target: StoreTarget,
}

impl PostgresSettings {
    /// Reads the password (file or systemd credential) and the CA, and
    /// prepares the connection parameters. Errors name the key and the fix.
    pub fn from_config(store: &StoreConfig) -> Result<PostgresSettings> {
        let url = store.url.as_deref().ok_or_else(|| {
            Error::usage(
                "store.url is not set; fix: set url = \"postgresql://warden@db.example.com:5432/warden\" in [store]",
            )
        })?;
        let target = parse_store_url(url)
            .map_err(|(problem, fix)| Error::usage(format!("{problem}; fix: {fix}")))?;
        if store.tls == StoreTls::Disable && !target.all_local() {
            return Err(Error::usage(format!(
                "store.tls is \"disable\" but the store server {} is not on this host; fix: use tls = \"verify-full\" with store.ca_file",
                target.display()
            )));
        }
        let mut config =
            postgres::Config::from_str(url).map_err(|e| Error::usage(format!("store.url: {e}")))?;
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(DEFAULT_CONNECT_TIMEOUT);
        }
        config
            .application_name("warden")
            .keepalives(true)
            .keepalives_idle(DEAD_PEER_TIMEOUT)
            .tcp_user_timeout(DEAD_PEER_TIMEOUT)
            // Notices (e.g. "already exists, skipping") are of no use here.
            .notice_callback(|_| {});
        if let Some(password) = read_password(store)? {
            config.password(password.as_slice());
        }
        let tls = match store.tls {
            StoreTls::Disable => {
                config.ssl_mode(postgres::config::SslMode::Disable);
                None
            }
            mode => {
                // Require TLS; the verifier below decides what "verified" means.
                config.ssl_mode(postgres::config::SslMode::Require);
                Some(tls_config(mode, store.ca_file.as_deref())?)
            }
        };
        Ok(PostgresSettings {
            config,
            tls,
            target,
        })
    }

    /// `PostgreSQL store user@host:port/dbname`, for messages.
    pub fn describe(&self) -> String {
        format!(
            "PostgreSQL store {}@{}",
            self.target.user,
            self.target.display()
        )
    }

    /// A new connection, set up as the store's own.
    pub(crate) fn connect(&self) -> Result<postgres::Client> {
        self.connect_with(&self.config)
    }

    /// Connections made with these settings are named `name` in
    /// `pg_stat_activity` (the fleet shipper's: `warden-shipper`).
    pub fn named(mut self, name: &str) -> PostgresSettings {
        self.config.application_name(name);
        self
    }

    /// The change listener's connection, named `warden-listener` in
    /// `pg_stat_activity`.
    pub(crate) fn connect_listener(&self) -> Result<postgres::Client> {
        let mut config = self.config.clone();
        config.application_name("warden-listener");
        self.connect_with(&config)
    }

    fn connect_with(&self, config: &postgres::Config) -> Result<postgres::Client> {
        let connected = match &self.tls {
            None => config.connect(postgres::NoTls),
            Some(tls) => config.connect(RustlsConnector(tls.clone())),
        };
        let mut client = connected.map_err(|e| self.connect_error(&e))?;
        // Durable when a write returns: keep a stronger server setting
        // (remote_write, remote_apply), raise a weaker one.
        let at = self.describe();
        let row = client
            .query_one("SHOW synchronous_commit", &[])
            .map_err(|e| db_error(&at, &e))?;
        let sync: String = col(&row, 0, &at)?;
        let mut setup = format!("SET statement_timeout = '{STATEMENT_TIMEOUT}';");
        if sync == "off" || sync == "local" {
            setup.push_str("SET synchronous_commit = on;");
        }
        client
            .batch_execute(&setup)
            .map_err(|e| db_error(&at, &e))?;
        Ok(client)
    }

    fn connect_error(&self, e: &postgres::Error) -> Error {
        let at = self.describe();
        let mut unreachable = false;
        let (why, fix) = match e.as_db_error() {
            Some(db) => {
                let code = db.code().code();
                // Shutting down, starting up, in recovery, or a broken link:
                // the server is there but cannot serve (an outage).
                unreachable = code.starts_with("57P") || code.starts_with("08");
                let fix = match code {
                    "28P01" | "28000" => "check the password in store.password_file (or store.password_credential) and the server's pg_hba.conf for this user",
                    "3D000" => "create the database (CREATE DATABASE … OWNER …) or fix the database name in store.url",
                    "53300" => "the server has no free connection slots: raise max_connections or lower other clients' pools",
                    _ => "see the PostgreSQL server's log for the reason",
                };
                (format!("{} {}: {}", db.severity(), code, db.message()), fix)
            }
            None => {
                let text = error_chain(e);
                let fix = if text.contains("lookup address") {
                    "check that the host name in store.url resolves on this node (DNS, /etc/hosts)"
                } else if text.contains("certificate") || text.contains("TLS") {
                    "check store.ca_file (the CA that signed the server's certificate) and that the certificate names the host in store.url (or use tls = \"verify-ca\")"
                } else {
                    unreachable = true;
                    "check that the server runs and that the host and port in store.url reach it (a firewall, a wrong port, or a server not listening on that address)"
                };
                (text, fix)
            }
        };
        let message = format!("cannot connect to the {at} (store.url): {why}; fix: {fix}");
        if unreachable {
            // Exit code 7: the store is unreachable (an outage, not a
            // misconfiguration); see `super::health`.
            Error::unavailable(message)
        } else {
            Error::internal(message)
        }
    }
}

/// The error and its sources, e.g. "error performing TLS handshake: invalid
/// peer certificate: UnknownIssuer".
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let part = s.to_string();
        if !text.contains(&part) {
            text.push_str(": ");
            text.push_str(&part);
        }
        source = s.source();
    }
    text
}

/// The password from `store.password_file` or the systemd credential
/// `store.password_credential`, one trailing newline removed; None if neither
/// is set (the server trusts this client some other way, e.g. a certificate or
/// `peer`). The file must be private to its owner.
fn read_password(store: &StoreConfig) -> Result<Option<Zeroizing<Vec<u8>>>> {
    use std::os::unix::fs::PermissionsExt;
    let (path, key): (PathBuf, &str) = match (&store.password_file, &store.password_credential) {
        (Some(p), _) => (p.clone(), "store.password_file"),
        (None, Some(name)) => {
            let dir = std::env::var_os("CREDENTIALS_DIRECTORY").ok_or_else(|| {
                Error::usage(format!(
                    "store.password_credential = {name:?}, but $CREDENTIALS_DIRECTORY is not set (warden was not started by systemd with a credential); fix: add LoadCredential={name}:/etc/warden/store-password to the unit, or use store.password_file"
                ))
            })?;
            (PathBuf::from(dir).join(name), "store.password_credential")
        }
        (None, None) => return Ok(None),
    };
    let shown = path.display();
    let md = std::fs::metadata(&path).map_err(|e| {
        Error::usage(format!(
            "{key}: cannot read {shown}: {e}; fix: create it with the store role's password (mode 0600) or correct the path"
        ))
    })?;
    let mode = md.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(Error::usage(format!(
            "{key}: {shown} can be read by group or others (mode {mode:o}); fix: chmod 600 {shown}"
        )));
    }
    let mut bytes = Zeroizing::new(
        std::fs::read(&path)
            .map_err(|e| Error::usage(format!("{key}: cannot read {shown}: {e}")))?,
    );
    if bytes.ends_with(b"\n") {
        bytes.pop();
        if bytes.ends_with(b"\r") {
            bytes.pop();
        }
    }
    if bytes.is_empty() {
        return Err(Error::usage(format!(
            "{key}: {shown} is empty; fix: write the store role's password into it"
        )));
    }
    Ok(Some(bytes))
}

/// rustls client configuration for `verify-full` (chain and host name) or
/// `verify-ca` (chain only), with the roots from `ca_file` or the system bundle.
fn tls_config(mode: StoreTls, ca_file: Option<&Path>) -> Result<Arc<ClientConfig>> {
    let path = ca_file.unwrap_or(Path::new("/etc/ssl/certs/ca-certificates.crt"));
    let key = if ca_file.is_some() {
        "store.ca_file"
    } else {
        "store.ca_file (unset: the system bundle)"
    };
    let shown = path.display();
    let mut roots = RootCertStore::empty();
    let certs = CertificateDer::pem_file_iter(path).map_err(|e| {
        Error::usage(format!(
            "{key}: cannot read {shown}: {e}; fix: point ca_file at the PEM CA certificate that signed the store server's certificate"
        ))
    })?;
    for cert in certs {
        let cert = cert.map_err(|e| Error::usage(format!("{key}: bad PEM in {shown}: {e}")))?;
        roots
            .add(cert)
            .map_err(|e| Error::usage(format!("{key}: unusable CA in {shown}: {e}")))?;
    }
    if roots.is_empty() {
        return Err(Error::usage(format!(
            "{key}: {shown} holds no CA certificate"
        )));
    }
    let builder = ClientConfig::builder_with_provider(crate::tls::provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::internal(format!("TLS setup: {e}")))?;
    let config = match mode {
        StoreTls::VerifyCa => {
            let inner = rustls::client::WebPkiServerVerifier::builder_with_provider(
                Arc::new(roots),
                crate::tls::provider(),
            )
            .build()
            .map_err(|e| Error::usage(format!("{key}: {e}")))?;
            builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(crate::tls::ChainVerifier::new(
                    inner, None,
                )))
                .with_no_client_auth()
        }
        StoreTls::VerifyFull | StoreTls::Disable => {
            builder.with_root_certificates(roots).with_no_client_auth()
        }
    };
    Ok(Arc::new(config))
}

/// tokio-postgres' TLS hooks on rustls: the server name from the host in the
/// URL, and `tls-server-end-point` channel binding for SCRAM-SHA-256-PLUS.
#[derive(Clone)]
struct RustlsConnector(Arc<ClientConfig>);

struct RustlsConnect {
    config: Arc<ClientConfig>,
    name: ServerName<'static>,
}

struct RustlsStream(Box<tokio_rustls::client::TlsStream<Socket>>);

impl MakeTlsConnect<Socket> for RustlsConnector {
    type Stream = RustlsStream;
    type TlsConnect = RustlsConnect;
    type Error = rustls::pki_types::InvalidDnsNameError;

    fn make_tls_connect(
        &mut self,
        domain: &str,
    ) -> std::result::Result<RustlsConnect, Self::Error> {
        Ok(RustlsConnect {
            config: self.0.clone(),
            name: ServerName::try_from(domain.to_string())?,
        })
    }
}

impl TlsConnect<Socket> for RustlsConnect {
    type Stream = RustlsStream;
    type Error = std::io::Error;
    type Future = Pin<Box<dyn Future<Output = std::io::Result<RustlsStream>> + Send>>;

    fn connect(self, stream: Socket) -> Self::Future {
        Box::pin(async move {
            let tls = tokio_rustls::TlsConnector::from(self.config)
                .connect(self.name, stream)
                .await?;
            Ok(RustlsStream(Box::new(tls)))
        })
    }
}

impl TlsStream for RustlsStream {
    fn channel_binding(&self) -> ChannelBinding {
        let (_, conn) = self.0.get_ref();
        match conn.peer_certificates().and_then(|chain| chain.first()) {
            Some(cert) => ChannelBinding::tls_server_end_point(crate::tls::server_end_point(cert)),
            None => ChannelBinding::none(),
        }
    }
}

impl AsyncRead for RustlsStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut *self.0).poll_read(cx, buf)
    }
}

impl AsyncWrite for RustlsStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut *self.0).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut *self.0).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut *self.0).poll_shutdown(cx)
    }
}

/// A database error as a warden error: where, what (severity, SQLSTATE,
/// message — PostgreSQL never echoes bound parameters, so no sealed bytes),
/// and a hint for the failures an operator can fix.
fn db_error(at: &str, e: &postgres::Error) -> Error {
    match e.as_db_error() {
        Some(db) => {
            let code = db.code().code();
            let hint = match code {
                "42501" => "; fix: grant the store role CREATE and USAGE on the schema (or make it the database's owner)",
                "25006" => "; fix: store.url reaches a read-only standby: point it at the primary (e.g. add target_session_attrs=read-write)",
                "53100" => "; fix: the database server's disk is full",
                "57014" => "; fix: a statement ran longer than 60s: a lock held by another node, or a server in trouble",
                "40001" | "40P01" => "; the change was rolled back: try again",
                _ => "",
            };
            Error::internal(format!(
                "{at}: {} {code}: {}{hint}",
                db.severity(),
                db.message()
            ))
        }
        None if e.is_closed() => Error::internal(format!(
            "{at}: the connection was lost ({}); nothing of this change was kept unless it had committed; warden reconnects on the next operation",
            error_chain(e)
        )),
        None => Error::internal(format!("{at}: {}", error_chain(e))),
    }
}

/// The connection and its state, owned by the backend's thread.
struct Session {
    settings: PostgresSettings,
    at: String,
    client: Option<postgres::Client>,
    /// Told of every connection made or failed (see [`super::health`]).
    health: Arc<super::health::StoreHealth>,
    /// A transaction spanning several jobs is open: a lost connection must
    /// fail it, never be replaced silently in its middle.
    in_transaction: bool,
}

impl Session {
    /// The connection, made (again) if there is none or it broke.
    fn client(&mut self) -> Result<&mut postgres::Client> {
        let broken = self.client.as_ref().is_none_or(|c| c.is_closed());
        if broken {
            self.client = None;
            if self.in_transaction {
                return Err(Error::internal(format!(
                    "{}: the connection was lost in the middle of a change, which was rolled back",
                    self.at
                )));
            }
            match self.settings.connect() {
                Ok(c) => {
                    self.health.reachable();
                    self.client = Some(c);
                }
                Err(mut e) => {
                    // A server that answered (a refused password, a missing
                    // database) is reachable, just misconfigured.
                    if e.kind == crate::error::ErrorKind::Unavailable {
                        self.health.unreachable(&e.message);
                        if let Some(o) = self.health.outage() {
                            e.message
                                .push_str(&format!(" (unreachable {})", o.describe_since()));
                        }
                    }
                    return Err(e);
                }
            }
        }
        self.client
            .as_mut()
            .ok_or_else(|| Error::internal(format!("{}: no connection", self.at)))
    }

    /// Runs `work` on the connection. Outside a transaction, a connection
    /// found dead (the server restarted, a proxy dropped it while idle) is
    /// remade and `work` runs once more: everything run this way is a
    /// read, an idempotent write or a whole transaction that failed.
    fn with_retry<T>(
        &mut self,
        mut work: impl FnMut(&mut postgres::Client) -> std::result::Result<T, Failure>,
    ) -> Result<T> {
        let first = work(self.client()?);
        let at = self.at.clone();
        match first {
            Ok(v) => Ok(v),
            Err(Failure::Db(e)) if connection_gone(&e) && !self.in_transaction => {
                self.client = None;
                work(self.client()?).map_err(|f| f.into_error(&at))
            }
            Err(f) => Err(f.into_error(&at)),
        }
    }

    fn execute(&mut self, sql: &str, params: &[&(dyn ToSql + Sync)]) -> Result<u64> {
        self.with_retry(|c| Ok(c.execute(sql, params)?))
    }

    fn query(&mut self, sql: &str, params: &[&(dyn ToSql + Sync)]) -> Result<Vec<postgres::Row>> {
        self.with_retry(|c| Ok(c.query(sql, params)?))
    }

    /// Bumps the change counter and queues the notification of `what`
    /// (`<kind>:<name>`) in the open transaction.
    fn announce(&mut self, what: &str) -> Result<()> {
        self.query(ANNOUNCE, &[&what]).map(|_| ())
    }

    fn begin(&mut self) -> Result<()> {
        self.with_retry(|c| Ok(c.batch_execute("BEGIN")?))?;
        self.in_transaction = true;
        Ok(())
    }

    /// Ends the open transaction with `COMMIT` or `ROLLBACK`.
    fn finish(&mut self, sql: &str) -> Result<()> {
        let at = self.at.clone();
        let result = match self.client() {
            Ok(c) => c.batch_execute(sql).map_err(|e| {
                let mut err = db_error(&at, &e);
                if sql == "COMMIT" && e.is_closed() {
                    // Lost before the server's answer: it may have committed.
                    err.message.push_str(
                        " (if the connection broke while committing, the change may have been applied: check with `warden secret versions`)",
                    );
                }
                err
            }),
            Err(e) => Err(e),
        };
        self.in_transaction = false;
        result
    }
}

/// Whether `e` ended the connection: it was closed, or the server sent a
/// FATAL error (terminated by an administrator, shutting down), which it
/// follows by closing.
fn connection_gone(e: &postgres::Error) -> bool {
    e.is_closed()
        || e.as_db_error()
            .is_some_and(|db| matches!(db.severity(), "FATAL" | "PANIC"))
}

/// Why work on the connection failed: the database (maybe a dead
/// connection, worth one retry) or warden.
enum Failure {
    Db(postgres::Error),
    Warden(Error),
}

impl From<postgres::Error> for Failure {
    fn from(e: postgres::Error) -> Self {
        Failure::Db(e)
    }
}

impl From<Error> for Failure {
    fn from(e: Error) -> Self {
        Failure::Warden(e)
    }
}

impl Failure {
    fn into_error(self, at: &str) -> Error {
        match self {
            Failure::Db(e) => db_error(at, &e),
            Failure::Warden(e) => e,
        }
    }
}

type Job = Box<dyn FnOnce(&mut Session) + Send>;

/// The PostgreSQL store. See the module documentation.
pub struct PostgresBackend {
    jobs: mpsc::Sender<Job>,
    at: String,
    /// This node's name on its lease rows.
    node: String,
}

/// Column `i` of a row; a column of an unexpected type (a schema changed by
/// hand) is an error, not a panic.
fn col<'a, T: postgres::types::FromSql<'a>>(r: &'a postgres::Row, i: usize, at: &str) -> Result<T> {
    r.try_get(i).map_err(|e| {
        Error::integrity(format!(
            "{at}: column {i} of a row has an unexpected type ({e}): was the schema changed by hand?"
        ))
    })
}

/// Reads a `bigint` version column as the trait's `u32`.
fn version_of(v: i64, at: &str) -> Result<u32> {
    u32::try_from(v).map_err(|_| {
        Error::integrity(format!(
            "{at}: a row holds version number {v}, out of range"
        ))
    })
}

fn now() -> String {
    crate::timefmt::now_rfc3339()
}

/// The name a node's lease rows carry: host name and data dir, unique in a
/// fleet as long as host names are.
pub fn node_name(data_dir: &Path) -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_default();
    format!("{host}:{}", data_dir.display())
}

/// An open multi-step transaction; rolled back on drop unless committed.
struct Transaction<'a> {
    backend: &'a PostgresBackend,
    open: bool,
}

impl Transaction<'_> {
    fn commit(mut self) -> Result<()> {
        self.open = false;
        self.backend.run(|s| s.finish("COMMIT"))
    }
}

impl Drop for Transaction<'_> {
    fn drop(&mut self) {
        if self.open {
            let _ = self.backend.run(|s| s.finish("ROLLBACK"));
        }
    }
}

impl PostgresBackend {
    /// Connects and applies pending migrations; refuses a schema newer than
    /// this warden knows.
    pub fn open(settings: PostgresSettings, node: &str) -> Result<PostgresBackend> {
        let backend = Self::connect(settings, node)?;
        backend.migrate()?;
        Ok(backend)
    }

    /// Connects (checking that the server answers) without touching the schema.
    pub fn connect(settings: PostgresSettings, node: &str) -> Result<PostgresBackend> {
        let at = settings.describe();
        let (jobs, queue) = mpsc::channel::<Job>();
        let mut session = Session {
            settings,
            at: at.clone(),
            client: None,
            health: super::health::StoreHealth::of(&at),
            in_transaction: false,
        };
        std::thread::Builder::new()
            .name("warden-store-pg".into())
            .spawn(move || {
                // Ends when the backend (the only sender) is dropped.
                while let Ok(job) = queue.recv() {
                    let ran = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                        job(&mut session)
                    }));
                    if ran.is_err() {
                        // The caller sees its call fail (its reply channel is
                        // gone); start the next one on a fresh connection.
                        session.client = None;
                        session.in_transaction = false;
                    }
                }
            })
            .map_err(|e| Error::internal(format!("{at}: cannot start its thread: {e}")))?;
        let backend = PostgresBackend {
            jobs,
            at,
            node: node.to_string(),
        };
        backend.run(|s| s.client().map(|_| ()))?;
        Ok(backend)
    }

    /// `PostgreSQL store user@host:port/dbname`.
    pub fn describe(&self) -> &str {
        &self.at
    }

    /// Runs `job` on the connection's thread and waits for its result.
    fn run<T: Send + 'static>(
        &self,
        job: impl FnOnce(&mut Session) -> Result<T> + Send + 'static,
    ) -> Result<T> {
        let (reply, result) = mpsc::sync_channel(1);
        let job: Job = Box::new(move |s| {
            let _ = reply.send(job(s));
        });
        let gone = || {
            Error::internal(format!(
                "{}: the call failed on the store's connection thread",
                self.at
            ))
        };
        self.jobs.send(job).map_err(|_| gone())?;
        result.recv().map_err(|_| gone())?
    }

    fn begin(&self) -> Result<Transaction<'_>> {
        self.run(|s| s.begin())?;
        Ok(Transaction {
            backend: self,
            open: true,
        })
    }

    /// Applies every pending migration in one transaction under the advisory
    /// lock. Returns (version before, version after).
    pub fn migrate(&self) -> Result<(i32, i32)> {
        let applied_by = format!("warden {} on {}", env!("CARGO_PKG_VERSION"), self.node);
        self.run(move |s| {
            let at = s.at.clone();
            s.with_retry(|client| {
                let mut tx = client.transaction()?;
                tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])?;
                tx.batch_execute(
                    "CREATE TABLE IF NOT EXISTS warden_schema (
                         version    integer PRIMARY KEY,
                         applied_at timestamptz NOT NULL DEFAULT now(),
                         applied_by text NOT NULL
                     )",
                )?;
                let row =
                    tx.query_one("SELECT coalesce(max(version), 0) FROM warden_schema", &[])?;
                let before: i32 = col(&row, 0, &at)?;
                if before > SCHEMA_VERSION {
                    return Err(Error::usage(format!(
                        "the {at} has schema version {before}, newer than this warden knows ({SCHEMA_VERSION}): a newer warden migrated it; fix: upgrade warden on this node"
                    ))
                    .into());
                }
                for (i, sql) in MIGRATIONS.iter().enumerate().skip(before.max(0) as usize) {
                    let version = i as i32 + 1;
                    tx.batch_execute(sql).map_err(|e| {
                        Error::internal(format!(
                            "schema migration {version} failed, nothing was changed: {}",
                            db_error(&at, &e).message
                        ))
                    })?;
                    tx.execute(
                        "INSERT INTO warden_schema (version, applied_by) VALUES ($1, $2)",
                        &[&version, &applied_by],
                    )?;
                }
                tx.commit()?;
                Ok((before, SCHEMA_VERSION))
            })
        })
    }

    /// The schema version recorded in the database (0 before the first migration).
    pub fn schema_version(&self) -> Result<i32> {
        self.run(|s| {
            let rows = s.query("SELECT coalesce(max(version), 0) FROM warden_schema", &[])?;
            match rows.first() {
                Some(r) => col(r, 0, &s.at),
                None => Ok(0),
            }
        })
    }

    /// Sets `key` only if it is absent; false if another value is there.
    /// `warden init` claims a store with its seal configuration this way, so
    /// two nodes initialising one store at once cannot both succeed.
    pub fn meta_insert_new(&mut self, key: &str, value: &str) -> Result<bool> {
        let (key, value) = (key.to_string(), value.to_string());
        self.run(move |s| {
            s.execute(
                "INSERT INTO meta (key, value) VALUES ($1, $2) ON CONFLICT (key) DO NOTHING",
                &[&key, &value],
            )
            .map(|n| n == 1)
        })
    }

    /// Empties every table (a failed `warden init` that had claimed the store
    /// leaves nothing behind). The schema stays.
    pub fn discard_everything(&mut self) -> Result<()> {
        self.run(|s| {
            s.with_retry(|c| {
                Ok(c.batch_execute(
                    "BEGIN; DELETE FROM secret_versions; DELETE FROM secrets; DELETE FROM leases; DELETE FROM meta; DELETE FROM claims;
                     UPDATE change_counter SET value = value + 1 WHERE id = 1;
                     SELECT pg_notify('warden_changes', value::text || ':all:discarded') FROM change_counter;
                     COMMIT;",
                )?)
            })
        })
    }
}

/// One record of a node's audit log as the store holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditCopy {
    pub node: String,
    pub log: String,
    pub seq: u64,
    pub hash: String,
    /// The line exactly as the node wrote it (without its newline).
    pub line: String,
}

/// One access event summary as the store holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredEvent {
    pub id: i64,
    pub node: String,
    /// The event as JSON (what `warden events --json` prints).
    pub event: String,
}

/// A node applied the freeze `freeze` (see `crate::fleet_views::freeze_id`)
/// of `workload`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct FreezeAck {
    pub workload: String,
    pub node: String,
    pub freeze: String,
    pub applied_at: String,
}

const AUDIT_COPY_COLUMNS: &str = "node, log, seq, hash, line";

fn audit_copy_of(r: &postgres::Row, at: &str) -> Result<AuditCopy> {
    Ok(AuditCopy {
        node: col(r, 0, at)?,
        log: col(r, 1, at)?,
        seq: u64::try_from(col::<i64>(r, 2, at)?).unwrap_or(0),
        hash: col(r, 3, at)?,
        line: col(r, 4, at)?,
    })
}

fn stored_event_of(r: &postgres::Row, at: &str) -> Result<StoredEvent> {
    Ok(StoredEvent {
        id: col(r, 0, at)?,
        node: col(r, 1, at)?,
        event: col(r, 2, at)?,
    })
}

/// Fleet views (`crate::fleet_views`): the audit copy, the access event
/// summary and freeze acknowledgements. None of these is announced: they
/// change with every session, and nothing caches them.
impl PostgresBackend {
    /// This node's name (host name and data dir).
    pub fn node_name(&self) -> &str {
        &self.node
    }

    /// The newest record of `node`'s log `log` in the store: (seq, hash).
    pub fn audit_copy_head(&self, node: &str, log: &str) -> Result<Option<(u64, String)>> {
        let (node, log) = (node.to_string(), log.to_string());
        self.run(move |s| {
            let rows = s.query(
                "SELECT seq, hash FROM audit_records WHERE node = $1 AND log = $2
                 ORDER BY seq DESC LIMIT 1",
                &[&node, &log],
            )?;
            rows.first()
                .map(|r| {
                    Ok((
                        u64::try_from(col::<i64>(r, 0, &s.at)?).unwrap_or(0),
                        col(r, 1, &s.at)?,
                    ))
                })
                .transpose()
        })
    }

    /// Inserts records of this node's log `log` — (seq, time, hash, line) —
    /// in one statement (one transaction). Records the store already holds
    /// are left as they are. Returns how many were new.
    pub fn audit_copy_insert(
        &self,
        log: &str,
        rows: Vec<(u64, String, String, String)>,
    ) -> Result<u64> {
        let (node, log) = (self.node.clone(), log.to_string());
        let mut seqs = Vec::with_capacity(rows.len());
        let mut times = Vec::with_capacity(rows.len());
        let mut hashes = Vec::with_capacity(rows.len());
        let mut lines = Vec::with_capacity(rows.len());
        for (seq, time, hash, line) in rows {
            seqs.push(i64::try_from(seq).unwrap_or(i64::MAX));
            times.push(time);
            hashes.push(hash);
            lines.push(line);
        }
        self.run(move |s| {
            s.execute(
                "INSERT INTO audit_records (node, log, seq, at, hash, line)
                 SELECT $1, $2, r.seq, r.at::timestamptz, r.hash, r.line
                 FROM unnest($3::bigint[], $4::text[], $5::text[], $6::text[]) AS r(seq, at, hash, line)
                 ON CONFLICT (node, log, seq) DO NOTHING",
                &[&node, &log, &seqs, &times, &hashes, &lines],
            )
        })
    }

    /// The newest `limit` records of every node, oldest first (by the time
    /// each node wrote them).
    pub fn audit_copy_latest(&self, limit: usize) -> Result<Vec<AuditCopy>> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        self.run(move |s| {
            let rows = s.query(
                &format!(
                    "SELECT {AUDIT_COPY_COLUMNS} FROM (
                         SELECT * FROM audit_records ORDER BY at DESC, node DESC, seq DESC LIMIT $1
                     ) newest ORDER BY at, node, seq"
                ),
                &[&limit],
            )?;
            rows.iter().map(|r| audit_copy_of(r, &s.at)).collect()
        })
    }

    /// Every (node, log) in the copy with its newest seq and record count.
    pub fn audit_copy_logs(&self) -> Result<Vec<(String, String, u64, u64)>> {
        self.run(move |s| {
            let rows = s.query(
                "SELECT node, log, max(seq), count(*) FROM audit_records GROUP BY node, log ORDER BY node, min(at)",
                &[],
            )?;
            rows.iter()
                .map(|r| {
                    Ok((
                        col(r, 0, &s.at)?,
                        col(r, 1, &s.at)?,
                        u64::try_from(col::<i64>(r, 2, &s.at)?).unwrap_or(0),
                        u64::try_from(col::<i64>(r, 3, &s.at)?).unwrap_or(0),
                    ))
                })
                .collect()
        })
    }

    /// Records past `seen` — (node, log, last seq seen) — ordered by time,
    /// at most `limit` per log (each log read through its primary key).
    pub fn audit_copy_after(
        &self,
        seen: &[(String, String, u64)],
        limit: usize,
    ) -> Result<Vec<AuditCopy>> {
        let nodes: Vec<String> = seen.iter().map(|k| k.0.clone()).collect();
        let logs: Vec<String> = seen.iter().map(|k| k.1.clone()).collect();
        let seqs: Vec<i64> = seen
            .iter()
            .map(|k| i64::try_from(k.2).unwrap_or(i64::MAX))
            .collect();
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        self.run(move |s| {
            let rows = s.query(
                "SELECT r.node, r.log, r.seq, r.hash, r.line
                 FROM unnest($1::text[], $2::text[], $3::bigint[]) AS k(node, log, seq)
                 CROSS JOIN LATERAL (
                     SELECT * FROM audit_records a
                     WHERE a.node = k.node AND a.log = k.log AND a.seq > k.seq
                     ORDER BY a.seq LIMIT $4
                 ) r
                 ORDER BY r.at, r.node, r.seq",
                &[&nodes, &logs, &seqs, &limit],
            )?;
            rows.iter().map(|r| audit_copy_of(r, &s.at)).collect()
        })
    }

    /// The (node, log) pairs with records shipped in the last `window`
    /// (through the `shipped_at` index: cheap on a large copy).
    pub fn audit_copy_recent_logs(&self, window: Duration) -> Result<Vec<(String, String)>> {
        let secs = window.as_secs_f64();
        self.run(move |s| {
            let rows = s.query(
                "SELECT DISTINCT node, log FROM audit_records
                 WHERE shipped_at > now() - make_interval(secs => $1)",
                &[&secs],
            )?;
            rows.iter()
                .map(|r| Ok((col(r, 0, &s.at)?, col(r, 1, &s.at)?)))
                .collect()
        })
    }

    /// Records of `node`'s log `log` after `after_seq`, in seq order, at most `limit`.
    pub fn audit_copy_page(
        &self,
        node: &str,
        log: &str,
        after_seq: u64,
        limit: usize,
    ) -> Result<Vec<AuditCopy>> {
        let (node, log) = (node.to_string(), log.to_string());
        let after = i64::try_from(after_seq).unwrap_or(i64::MAX);
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        self.run(move |s| {
            let rows = s.query(
                &format!(
                    "SELECT {AUDIT_COPY_COLUMNS} FROM audit_records
                     WHERE node = $1 AND log = $2 AND seq > $3 ORDER BY seq LIMIT $4"
                ),
                &[&node, &log, &after, &limit],
            )?;
            rows.iter().map(|r| audit_copy_of(r, &s.at)).collect()
        })
    }

    /// Adds this node's event summaries — (time, JSON) — in one statement.
    pub fn events_insert(&self, rows: Vec<(String, String)>) -> Result<u64> {
        let node = self.node.clone();
        let (times, events): (Vec<String>, Vec<String>) = rows.into_iter().unzip();
        self.run(move |s| {
            s.execute(
                "INSERT INTO access_events (node, at, event)
                 SELECT $1, e.at::timestamptz, e.event
                 FROM unnest($2::text[], $3::text[]) AS e(at, event)",
                &[&node, &times, &events],
            )
        })
    }

    /// Drops this node's event summaries beyond the newest `keep` and older
    /// than `max_age`; and every node's older than twice that (nodes gone).
    pub fn events_prune(&self, keep: usize, max_age: Duration) -> Result<u64> {
        let node = self.node.clone();
        let keep = i64::try_from(keep).unwrap_or(i64::MAX);
        let secs = max_age.as_secs_f64();
        self.run(move |s| {
            let by_count = s.execute(
                "DELETE FROM access_events WHERE node = $1 AND id <= (
                     SELECT id FROM access_events WHERE node = $1 ORDER BY id DESC OFFSET $2 LIMIT 1)",
                &[&node, &keep],
            )?;
            let by_age = s.execute(
                "DELETE FROM access_events
                 WHERE (node = $1 AND at < now() - make_interval(secs => $2))
                    OR at < now() - make_interval(secs => $2 * 2)",
                &[&node, &secs],
            )?;
            Ok(by_count + by_age)
        })
    }

    /// The newest `limit` event summaries of every node, oldest first.
    pub fn events_latest(&self, limit: usize) -> Result<Vec<StoredEvent>> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        self.run(move |s| {
            let rows = s.query(
                "SELECT id, node, event FROM (
                     SELECT * FROM access_events ORDER BY at DESC, id DESC LIMIT $1
                 ) newest ORDER BY at, id",
                &[&limit],
            )?;
            rows.iter().map(|r| stored_event_of(r, &s.at)).collect()
        })
    }

    /// The highest event summary id (0: none).
    pub fn events_newest_id(&self) -> Result<i64> {
        self.run(move |s| {
            let rows = s.query("SELECT coalesce(max(id), 0) FROM access_events", &[])?;
            match rows.first() {
                Some(r) => col(r, 0, &s.at),
                None => Ok(0),
            }
        })
    }

    /// Event summaries with an id above `after` (in id order), at most `limit`.
    pub fn events_after(&self, after: i64, limit: usize) -> Result<Vec<StoredEvent>> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        self.run(move |s| {
            let rows = s.query(
                "SELECT id, node, event FROM access_events WHERE id > $1 ORDER BY id LIMIT $2",
                &[&after, &limit],
            )?;
            rows.iter().map(|r| stored_event_of(r, &s.at)).collect()
        })
    }

    /// Makes this node's freeze acknowledgements exactly `applied`
    /// (workload, freeze id): rows of freezes it no longer applies go, new ones
    /// get the current time, unchanged ones keep theirs.
    pub fn freeze_acks_replace(&self, applied: Vec<(String, String)>) -> Result<()> {
        let node = self.node.clone();
        let (workloads, freezes): (Vec<String>, Vec<String>) = applied.into_iter().unzip();
        let now = now();
        self.run(move |s| {
            s.with_retry(|client| {
                let mut tx = client.transaction()?;
                tx.execute(
                    "DELETE FROM freeze_acks WHERE node = $1 AND NOT (workload = ANY($2::text[]))",
                    &[&node, &workloads],
                )?;
                tx.execute(
                    "INSERT INTO freeze_acks (workload, node, freeze_id, applied_at)
                     SELECT a.workload, $1, a.freeze_id, $4
                     FROM unnest($2::text[], $3::text[]) AS a(workload, freeze_id)
                     ON CONFLICT (workload, node) DO UPDATE
                         SET freeze_id = excluded.freeze_id, applied_at = excluded.applied_at
                         WHERE freeze_acks.freeze_id <> excluded.freeze_id",
                    &[&node, &workloads, &freezes, &now],
                )?;
                Ok(tx.commit()?)
            })
        })
    }

    /// Every node's freeze acknowledgements.
    pub fn freeze_acks(&self) -> Result<Vec<FreezeAck>> {
        self.run(move |s| {
            let rows = s.query(
                "SELECT workload, node, freeze_id, applied_at FROM freeze_acks ORDER BY workload, node",
                &[],
            )?;
            rows.iter()
                .map(|r| {
                    Ok(FreezeAck {
                        workload: col(r, 0, &s.at)?,
                        node: col(r, 1, &s.at)?,
                        freeze: col(r, 2, &s.at)?,
                        applied_at: col(r, 3, &s.at)?,
                    })
                })
                .collect()
        })
    }
}

const UPSERT_META: &str = "INSERT INTO meta (key, value) VALUES ($1, $2)
     ON CONFLICT (key) DO UPDATE SET value = excluded.value";

impl SecretBackend for PostgresBackend {
    fn meta_get(&self, key: &str) -> Result<Option<String>> {
        let key = key.to_string();
        self.run(move |s| {
            let rows = s.query("SELECT value FROM meta WHERE key = $1", &[&key])?;
            rows.first().map(|r| col(r, 0, &s.at)).transpose()
        })
    }

    fn meta_list(&self, prefix: &str) -> Result<Vec<(String, String)>> {
        let prefix = prefix.to_string();
        self.run(move |s| {
            let rows = s.query(
                "SELECT key, value FROM meta WHERE left(key, length($1)) = $1 ORDER BY key",
                &[&prefix],
            )?;
            rows.iter()
                .map(|r| Ok((col(r, 0, &s.at)?, col(r, 1, &s.at)?)))
                .collect()
        })
    }

    fn meta_delete(&mut self, key: &str) -> Result<()> {
        let key = key.to_string();
        self.run(move |s| {
            let what = format!("meta:{key}");
            s.with_retry(|client| {
                let mut tx = client.transaction()?;
                tx.execute("DELETE FROM meta WHERE key = $1", &[&key])?;
                tx.query(ANNOUNCE, &[&what])?;
                Ok(tx.commit()?)
            })
        })
    }

    fn meta_set(&mut self, key: &str, value: &str) -> Result<()> {
        let (key, value) = (key.to_string(), value.to_string());
        self.run(move |s| {
            let what = format!("meta:{key}");
            s.with_retry(|client| {
                let mut tx = client.transaction()?;
                tx.execute(UPSERT_META, &[&key, &value])?;
                tx.query(ANNOUNCE, &[&what])?;
                Ok(tx.commit()?)
            })
        })
    }

    fn meta_update(
        &mut self,
        key: &str,
        update: &mut dyn FnMut(Option<String>) -> Result<String>,
    ) -> Result<()> {
        let tx = self.begin()?;
        let k = key.to_string();
        // Nodes updating the same key take turns; the row may not exist yet,
        // so a row lock would not do.
        let current = self.run(move |s| {
            s.query(
                "SELECT pg_advisory_xact_lock($1, hashtext($2))",
                &[&META_LOCK_CLASS, &k],
            )?;
            let rows = s.query("SELECT value FROM meta WHERE key = $1", &[&k])?;
            rows.first().map(|r| col::<String>(r, 0, &s.at)).transpose()
        })?;
        let value = update(current)?;
        let k = key.to_string();
        self.run(move |s| {
            s.execute(UPSERT_META, &[&k, &value])?;
            s.announce(&format!("meta:{k}"))
        })?;
        tx.commit()
    }

    fn node(&self) -> Option<&str> {
        Some(&self.node)
    }

    fn claim(&mut self, job: &str, ttl: Duration) -> Result<bool> {
        let (job, node, secs) = (job.to_string(), self.node.clone(), ttl.as_secs_f64());
        self.run(move |s| {
            // Taken when free, lapsed, or already ours (a renewal).
            let rows = s.query(
                "INSERT INTO claims (job, node, expires_at)
                     VALUES ($1, $2, now() + make_interval(secs => $3))
                 ON CONFLICT (job) DO UPDATE
                     SET node = excluded.node, expires_at = excluded.expires_at
                     WHERE claims.expires_at < now() OR claims.node = excluded.node
                 RETURNING node",
                &[&job, &node, &secs],
            )?;
            Ok(!rows.is_empty())
        })
    }

    fn release_claim(&mut self, job: &str) -> Result<()> {
        let (job, node) = (job.to_string(), self.node.clone());
        self.run(move |s| {
            s.execute(
                "DELETE FROM claims WHERE job = $1 AND node = $2",
                &[&job, &node],
            )
            .map(|_| ())
        })
    }

    fn put_version(
        &mut self,
        name: &str,
        env: &str,
        created_by: &str,
        keep: u32,
        seal: &mut dyn FnMut(u32) -> Result<SealedVersion>,
        before_commit: CommitHook<'_>,
    ) -> Result<u32> {
        let tx = self.begin()?;
        let (n, e, ts) = (name.to_string(), env.to_string(), now());
        // Reserves the number and locks the secret's row until commit: a
        // concurrent put (another node) waits and takes the next number.
        let version = self.run(move |s| {
            let rows = s.query(
                "INSERT INTO secrets (name, env, next_version, updated_at) VALUES ($1, $2, 2, $3)
                 ON CONFLICT (name, env) DO UPDATE
                     SET next_version = secrets.next_version + 1, updated_at = excluded.updated_at
                 RETURNING next_version - 1",
                &[&n, &e, &ts],
            )?;
            rows.first().map(|r| col::<i64>(r, 0, &s.at)).transpose()
        })?;
        let version = version
            .ok_or_else(|| Error::internal(format!("{}: no version number returned", self.at)))?;
        let version = version_of(version, &self.at)?;
        let sealed = seal(version)?;
        let (n, e, by, ts) = (
            name.to_string(),
            env.to_string(),
            created_by.to_string(),
            now(),
        );
        let oldest_dropped = i64::from(version) - i64::from(keep);
        self.run(move |s| {
            s.execute(
                "INSERT INTO secret_versions
                     (name, env, version, created_at, created_by, kek_id, wrapped_key, ciphertext)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
                &[
                    &n,
                    &e,
                    &i64::from(version),
                    &ts,
                    &by,
                    &sealed.kek_id,
                    &sealed.wrapped_key,
                    &sealed.ciphertext,
                ],
            )?;
            s.execute(
                "DELETE FROM secret_versions WHERE name = $1 AND env = $2 AND version <= $3",
                &[&n, &e, &oldest_dropped],
            )?;
            Ok(())
        })?;
        before_commit(version)?;
        let what = format!("secret:{name}/{env}");
        self.run(move |s| s.announce(&what))?;
        tx.commit()?;
        Ok(version)
    }

    fn get_version(
        &self,
        name: &str,
        env: &str,
        version: Option<u32>,
    ) -> Result<Option<VersionRow>> {
        let (n, e) = (name.to_string(), env.to_string());
        let rows = self.run(move |s| {
            let cols = "version, kek_id, wrapped_key, ciphertext";
            match version {
                Some(v) => s.query(
                    &format!("SELECT {cols} FROM secret_versions WHERE name = $1 AND env = $2 AND version = $3"),
                    &[&n, &e, &i64::from(v)],
                ),
                None => s.query(
                    &format!("SELECT {cols} FROM secret_versions WHERE name = $1 AND env = $2 ORDER BY version DESC LIMIT 1"),
                    &[&n, &e],
                ),
            }
        })?;
        match rows.first() {
            None => Ok(None),
            Some(r) => Ok(Some(VersionRow {
                version: version_of(col(r, 0, &self.at)?, &self.at)?,
                sealed: SealedVersion {
                    kek_id: col(r, 1, &self.at)?,
                    wrapped_key: col(r, 2, &self.at)?,
                    ciphertext: col(r, 3, &self.at)?,
                },
            })),
        }
    }

    fn list(&self, env: Option<&str>) -> Result<Vec<SecretSummary>> {
        let env = env.map(str::to_string);
        let rows = self.run(move |s| {
            s.query(
                "SELECT s.name, s.env, max(v.version), count(v.version), s.updated_at
                 FROM secrets s JOIN secret_versions v ON v.name = s.name AND v.env = s.env
                 WHERE ($1::text IS NULL OR s.env = $1)
                 GROUP BY s.name, s.env ORDER BY s.name, s.env",
                &[&env],
            )
        })?;
        rows.iter()
            .map(|r| {
                Ok(SecretSummary {
                    name: col(r, 0, &self.at)?,
                    env: col(r, 1, &self.at)?,
                    latest_version: version_of(col(r, 2, &self.at)?, &self.at)?,
                    versions_kept: version_of(col(r, 3, &self.at)?, &self.at)?,
                    updated_at: col(r, 4, &self.at)?,
                })
            })
            .collect()
    }

    fn versions(&self, name: &str, env: &str) -> Result<Vec<VersionInfo>> {
        let (n, e) = (name.to_string(), env.to_string());
        let rows = self.run(move |s| {
            s.query(
                "SELECT version, created_at, created_by, kek_id FROM secret_versions
                 WHERE name = $1 AND env = $2 ORDER BY version",
                &[&n, &e],
            )
        })?;
        rows.iter()
            .map(|r| {
                Ok(VersionInfo {
                    version: version_of(col(r, 0, &self.at)?, &self.at)?,
                    created_at: col(r, 1, &self.at)?,
                    created_by: col(r, 2, &self.at)?,
                    kek_id: col(r, 3, &self.at)?,
                })
            })
            .collect()
    }

    fn remove(&mut self, name: &str, env: &str, before_commit: CommitHook<'_>) -> Result<u32> {
        let tx = self.begin()?;
        let (n, e, ts) = (name.to_string(), env.to_string(), now());
        let removed = self.run(move |s| {
            // Locks the secret's row first, as a put does. The `secrets` row
            // stays as a tombstone so version numbers never repeat.
            s.execute(
                "UPDATE secrets SET updated_at = $3 WHERE name = $1 AND env = $2",
                &[&n, &e, &ts],
            )?;
            s.execute(
                "DELETE FROM secret_versions WHERE name = $1 AND env = $2",
                &[&n, &e],
            )
        })?;
        if removed == 0 {
            return Ok(0); // rolled back by `tx`'s drop
        }
        let removed = u32::try_from(removed).unwrap_or(u32::MAX);
        before_commit(removed)?;
        let what = format!("secret:{name}/{env}");
        self.run(move |s| s.announce(&what))?;
        tx.commit()?;
        Ok(removed)
    }

    fn rewrap_all(&mut self, rewrap: RewrapFn<'_>, meta: &[(&str, String)]) -> Result<u64> {
        let tx = self.begin()?;
        let rows = self.run(|s| {
            // Other nodes may read meanwhile but not write a row this
            // rotation would miss.
            s.execute("LOCK TABLE secret_versions IN EXCLUSIVE MODE", &[])?;
            s.query(
                "SELECT name, env, version, kek_id, wrapped_key FROM secret_versions
                 ORDER BY name, env, version",
                &[],
            )
        })?;
        let mut updates = Vec::with_capacity(rows.len());
        for r in &rows {
            let row = WrappedKeyRow {
                name: col(r, 0, &self.at)?,
                env: col(r, 1, &self.at)?,
                version: version_of(col(r, 2, &self.at)?, &self.at)?,
                kek_id: col(r, 3, &self.at)?,
                wrapped_key: col(r, 4, &self.at)?,
            };
            let (kek_id, wrapped) = rewrap(&row)?;
            updates.push((row.name, row.env, i64::from(row.version), kek_id, wrapped));
        }
        let count = updates.len() as u64;
        let meta: Vec<(String, String)> = meta
            .iter()
            .map(|(k, v)| (k.to_string(), v.clone()))
            .collect();
        self.run(move |s| {
            for (name, env, version, kek_id, wrapped) in &updates {
                s.execute(
                    "UPDATE secret_versions SET kek_id = $4, wrapped_key = $5
                     WHERE name = $1 AND env = $2 AND version = $3",
                    &[name, env, version, kek_id, wrapped],
                )?;
            }
            for (k, v) in &meta {
                s.execute(UPSERT_META, &[k, v])?;
            }
            s.announce("all:rewrap")
        })?;
        tx.commit()?;
        Ok(count)
    }

    fn lease_put_many(&mut self, leases: &[LeaseRow]) -> Result<()> {
        let leases = leases.to_vec();
        let node = self.node.clone();
        self.run(move |s| {
            s.with_retry(|client| {
                let mut tx = client.transaction()?;
                for l in &leases {
                    tx.execute(
                        "INSERT INTO leases (id, node, route, workload, role, state, owner_pid, created_at, expires_at, max_expires_at)
                         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)
                         ON CONFLICT (id) DO UPDATE SET node = excluded.node, route = excluded.route,
                             workload = excluded.workload, role = excluded.role, state = excluded.state,
                             owner_pid = excluded.owner_pid, created_at = excluded.created_at,
                             expires_at = excluded.expires_at, max_expires_at = excluded.max_expires_at",
                        &[
                            &l.id,
                            &node,
                            &l.route,
                            &l.workload,
                            &l.role,
                            &l.state,
                            &i64::from(l.owner_pid),
                            &l.created_at,
                            &l.expires_at,
                            &l.max_expires_at,
                        ],
                    )?;
                }
                Ok(tx.commit()?)
            })
        })
    }

    fn lease_delete(&mut self, id: &str) -> Result<()> {
        let (id, node) = (id.to_string(), self.node.clone());
        self.run(move |s| {
            s.execute(
                "DELETE FROM leases WHERE id = $1 AND node = $2",
                &[&id, &node],
            )
            .map(|_| ())
        })
    }

    fn lease_list(&self) -> Result<Vec<LeaseRow>> {
        let node = self.node.clone();
        let rows = self.run(move |s| {
            s.query(
                "SELECT id, route, workload, role, state, owner_pid, created_at, expires_at, max_expires_at
                 FROM leases WHERE node = $1 ORDER BY created_at, id",
                &[&node],
            )
        })?;
        rows.iter()
            .map(|r| {
                Ok(LeaseRow {
                    id: col(r, 0, &self.at)?,
                    route: col(r, 1, &self.at)?,
                    workload: col(r, 2, &self.at)?,
                    role: col(r, 3, &self.at)?,
                    state: col(r, 4, &self.at)?,
                    owner_pid: u32::try_from(col::<i64>(r, 5, &self.at)?).unwrap_or(0),
                    created_at: col(r, 6, &self.at)?,
                    expires_at: col(r, 7, &self.at)?,
                    max_expires_at: col(r, 8, &self.at)?,
                })
            })
            .collect()
    }

    fn lease_of_any_node(&self, id: &str) -> Result<Option<(String, LeaseRow)>> {
        let id = id.to_string();
        let rows = self.run(move |s| {
            s.query(
                "SELECT id, route, workload, role, state, owner_pid, created_at, expires_at, max_expires_at, node
                 FROM leases WHERE id = $1",
                &[&id],
            )
        })?;
        rows.first()
            .map(|r| {
                Ok((
                    col(r, 9, &self.at)?,
                    LeaseRow {
                        id: col(r, 0, &self.at)?,
                        route: col(r, 1, &self.at)?,
                        workload: col(r, 2, &self.at)?,
                        role: col(r, 3, &self.at)?,
                        state: col(r, 4, &self.at)?,
                        owner_pid: u32::try_from(col::<i64>(r, 5, &self.at)?).unwrap_or(0),
                        created_at: col(r, 6, &self.at)?,
                        expires_at: col(r, 7, &self.at)?,
                        max_expires_at: col(r, 8, &self.at)?,
                    },
                ))
            })
            .transpose()
    }
}
