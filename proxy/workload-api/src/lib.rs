//! The SPIFFE Workload API server: gRPC over a Unix socket, service
//! `SpiffeWorkloadAPI` exactly as in the SPIFFE `workload.proto` (no
//! package), so any SPIFFE client library (go-spiffe, rust `spiffe`,
//! py-spiffe, SPIRE's tooling) can fetch X.509-SVIDs, JWT-SVIDs and trust
//! bundles from warden.
//!
//! Who the caller is comes only from the socket: the kernel's `SO_PEERCRED`
//! (pid, uid, gid), taken once when the connection is accepted. Nothing the
//! client sends is trusted for identity; what it may have is decided by the
//! daemon's [`IdentityProvider`]. Every request must carry the metadata
//! `workload.spiffe.io: true` (the spec's guard against browsers and SSRF);
//! without it the call fails with `InvalidArgument`. Streams send their first
//! message at once and a new one whenever [`IdentityProvider::updates`]
//! moves and the answer changed; a `PermissionDenied` then ends the stream.
//!
//! There is no protoc here: the messages are hand-written prost structs with
//! the spec's field numbers ([`pb`]), and the dispatch is a hand-written
//! `tower::Service` that routes `/SpiffeWorkloadAPI/<Method>` to tonic's
//! `server::Grpc` with the prost codec. Private keys and tokens never reach a
//! log line, an error message or a `Debug` output.
//!
//! gRPC C-core (so Python's `grpcio` and py-spiffe), grpc-java and
//! grpc-swift send the socket path as HTTP/2 `:authority`, which the HTTP/2
//! layer under tonic rejects before any handler runs; a small layer on each
//! connection rewrites such an authority to `localhost` (see
//! `uds_authority`), so those clients work too.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::net::UnixListener;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::server::{Grpc, NamedService, ServerStreamingService, UnaryService};
use tonic::transport::server::UdsConnectInfo;
use tonic::{Request, Response, Status};
use tonic_prost::ProstCodec;
use zeroize::Zeroizing;

use pb::{
    JwtBundlesRequest, JwtBundlesResponse, JwtSvid, JwtSvidRequest, JwtSvidResponse,
    ValidateJwtSvidRequest, ValidateJwtSvidResponse, X509BundlesRequest, X509BundlesResponse,
    X509Svid, X509SvidRequest, X509SvidResponse,
};

/// The gRPC service name (the proto has no package).
pub const SERVICE_NAME: &str = "SpiffeWorkloadAPI";
/// The metadata key every request must carry with the value `true`.
pub const SECURITY_HEADER: &str = "workload.spiffe.io";

const PATH_FETCH_X509_SVID: &str = "/SpiffeWorkloadAPI/FetchX509SVID";
const PATH_FETCH_X509_BUNDLES: &str = "/SpiffeWorkloadAPI/FetchX509Bundles";
const PATH_FETCH_JWT_SVID: &str = "/SpiffeWorkloadAPI/FetchJWTSVID";
const PATH_FETCH_JWT_BUNDLES: &str = "/SpiffeWorkloadAPI/FetchJWTBundles";
const PATH_VALIDATE_JWT_SVID: &str = "/SpiffeWorkloadAPI/ValidateJWTSVID";

/// Requests are tiny (a JWT at most); refuse anything larger before decoding.
const MAX_REQUEST_BYTES: usize = 64 * 1024;
/// Concurrent RPCs one connection may have open.
const MAX_STREAMS_PER_CONNECTION: u32 = 64;
/// Pause after a failed `accept` (e.g. out of file descriptors).
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);
/// Starts like SPIRE's wording, which client libraries (go-spiffe, rust
/// `spiffe`) recognise as "not registered (yet)" and back off on.
const NO_IDENTITY: &str = "no identity issued: no identity registered for this process";

/// The Workload API messages, field for field as in the SPIFFE
/// `workload.proto`. Maps are `BTreeMap`s so encodings are deterministic.
pub mod provider;

pub mod pb {
    use std::collections::BTreeMap;
    use std::fmt;

    use zeroize::Zeroize;

    /// `X509SVIDRequest`: no parameters.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct X509SvidRequest {}

    /// `X509SVIDResponse`.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct X509SvidResponse {
        #[prost(message, repeated, tag = "1")]
        pub svids: Vec<X509Svid>,
        #[prost(bytes = "vec", repeated, tag = "2")]
        pub crl: Vec<Vec<u8>>,
        #[prost(btree_map = "string, bytes", tag = "3")]
        pub federated_bundles: BTreeMap<String, Vec<u8>>,
    }

    /// `X509SVID`: one SVID with its key and its trust domain's bundle.
    #[derive(Clone, PartialEq, prost::Message)]
    #[prost(skip_debug)]
    pub struct X509Svid {
        #[prost(string, tag = "1")]
        pub spiffe_id: String,
        /// DER certificates, concatenated, leaf first.
        #[prost(bytes = "vec", tag = "2")]
        pub x509_svid: Vec<u8>,
        /// PKCS#8 DER private key (unencrypted, as the spec requires).
        #[prost(bytes = "vec", tag = "3")]
        pub x509_svid_key: Vec<u8>,
        /// DER CA certificates of the SVID's trust domain, concatenated.
        #[prost(bytes = "vec", tag = "4")]
        pub bundle: Vec<u8>,
        #[prost(string, tag = "5")]
        pub hint: String,
    }

    impl fmt::Debug for X509Svid {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.debug_struct("X509Svid")
                .field("spiffe_id", &self.spiffe_id)
                .field("x509_svid_len", &self.x509_svid.len())
                .field("x509_svid_key", &"<redacted>")
                .field("bundle_len", &self.bundle.len())
                .field("hint", &self.hint)
                .finish()
        }
    }

    impl Drop for X509Svid {
        fn drop(&mut self) {
            self.x509_svid_key.zeroize();
        }
    }

    /// `X509BundlesRequest`: no parameters.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct X509BundlesRequest {}

    /// `X509BundlesResponse`: DER bundles keyed by trust domain ID.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct X509BundlesResponse {
        #[prost(bytes = "vec", repeated, tag = "1")]
        pub crl: Vec<Vec<u8>>,
        #[prost(btree_map = "string, bytes", tag = "2")]
        pub bundles: BTreeMap<String, Vec<u8>>,
    }

    /// `JWTSVIDRequest`.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct JwtSvidRequest {
        #[prost(string, repeated, tag = "1")]
        pub audience: Vec<String>,
        #[prost(string, tag = "2")]
        pub spiffe_id: String,
    }

    /// `JWTSVIDResponse`.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct JwtSvidResponse {
        #[prost(message, repeated, tag = "1")]
        pub svids: Vec<JwtSvid>,
    }

    /// `JWTSVID`: one signed token.
    #[derive(Clone, PartialEq, prost::Message)]
    #[prost(skip_debug)]
    pub struct JwtSvid {
        #[prost(string, tag = "1")]
        pub spiffe_id: String,
        /// The JWT in JWS compact serialization (a bearer credential).
        #[prost(string, tag = "2")]
        pub svid: String,
        #[prost(string, tag = "3")]
        pub hint: String,
    }

    impl fmt::Debug for JwtSvid {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.debug_struct("JwtSvid")
                .field("spiffe_id", &self.spiffe_id)
                .field("svid", &"<redacted>")
                .field("hint", &self.hint)
                .finish()
        }
    }

    /// `JWTBundlesRequest`: no parameters.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct JwtBundlesRequest {}

    /// `JWTBundlesResponse`: JWKS documents keyed by trust domain ID.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct JwtBundlesResponse {
        #[prost(btree_map = "string, bytes", tag = "1")]
        pub bundles: BTreeMap<String, Vec<u8>>,
    }

    /// `ValidateJWTSVIDRequest`.
    #[derive(Clone, PartialEq, prost::Message)]
    #[prost(skip_debug)]
    pub struct ValidateJwtSvidRequest {
        #[prost(string, tag = "1")]
        pub audience: String,
        /// The token to validate (a bearer credential).
        #[prost(string, tag = "2")]
        pub svid: String,
    }

    impl fmt::Debug for ValidateJwtSvidRequest {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.debug_struct("ValidateJwtSvidRequest")
                .field("audience", &self.audience)
                .field("svid", &"<redacted>")
                .finish()
        }
    }

    /// `ValidateJWTSVIDResponse`.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct ValidateJwtSvidResponse {
        #[prost(string, tag = "1")]
        pub spiffe_id: String,
        #[prost(message, optional, tag = "2")]
        pub claims: Option<prost_types::Struct>,
    }
}

/// The caller, from the socket's `SO_PEERCRED` at connect time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CallerCred {
    /// `None` where the kernel did not report one.
    pub pid: Option<u32>,
    pub uid: u32,
    pub gid: u32,
}

/// One X.509-SVID as the provider hands it over.
pub struct X509SvidMaterial {
    pub spiffe_id: String,
    /// DER certificates, leaf first, then any intermediates.
    pub cert_chain_der: Vec<Vec<u8>>,
    /// The leaf's private key, PKCS#8 DER.
    pub key_pkcs8_der: Zeroizing<Vec<u8>>,
    /// DER CA certificates of the SVID's trust domain.
    pub bundle_der: Vec<Vec<u8>>,
    /// Operator hint; empty for none.
    pub hint: String,
}

impl std::fmt::Debug for X509SvidMaterial {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("X509SvidMaterial")
            .field("spiffe_id", &self.spiffe_id)
            .field("cert_chain_len", &self.cert_chain_der.len())
            .field("key_pkcs8_der", &"<redacted>")
            .field("bundle_len", &self.bundle_der.len())
            .field("hint", &self.hint)
            .finish()
    }
}

/// A provider's refusal or failure; each maps to one gRPC status code. The
/// message goes to the workload (except for `Internal`, which is logged and
/// replaced by a generic message), so it must hold no secret.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum IdentityError {
    #[error("permission denied: {0}")]
    PermissionDenied(String),
    #[error("unavailable: {0}")]
    Unavailable(String),
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    #[error("internal error: {0}")]
    Internal(String),
}

/// One trust domain's X.509 bundle: (trust domain, DER CA certificates).
pub type X509BundleEntry = (String, Vec<Vec<u8>>);

/// What the daemon supplies: identities and bundles for a caller. Methods are
/// synchronous and run on tokio's blocking pool, so they may touch disk.
pub trait IdentityProvider: Send + Sync + 'static {
    /// The caller's X.509-SVIDs, default first. Empty means "no identity".
    fn x509_svids(&self, caller: &CallerCred) -> Result<Vec<X509SvidMaterial>, IdentityError>;
    /// Trust bundles the caller should trust: (trust domain, DER CA certs).
    /// The trust domain is `example.org` or `spiffe://example.org`.
    fn x509_bundles(&self, caller: &CallerCred) -> Result<Vec<X509BundleEntry>, IdentityError>;
    /// JWT-SVIDs for `audience`: (SPIFFE ID, token). `spiffe_id` narrows the
    /// request to one of the caller's identities.
    fn jwt_svids(
        &self,
        caller: &CallerCred,
        audience: &[String],
        spiffe_id: Option<&str>,
    ) -> Result<Vec<(String, String)>, IdentityError>;
    /// JWT bundles: (trust domain, JWKS JSON).
    fn jwt_bundles(&self, caller: &CallerCred) -> Result<Vec<(String, Vec<u8>)>, IdentityError>;
    /// Validates `token` for `audience`: (SPIFFE ID, claims).
    fn validate_jwt(
        &self,
        caller: &CallerCred,
        audience: &str,
        token: &str,
    ) -> Result<(String, serde_json::Map<String, serde_json::Value>), IdentityError>;
    /// Bumps whenever SVIDs or bundles change (rotation, revocation); streams
    /// re-send on change.
    fn updates(&self) -> watch::Receiver<u64>;
    /// Called when a stream of method `op` opens; the returned value is
    /// dropped when it ends (metrics count open streams this way).
    fn stream_opened(&self, _op: &'static str) -> Option<Box<dyn Send>> {
        None
    }
}

/// Serves the Workload API on `listener` until `shutdown` completes. Open
/// streams then end with `Unavailable` (clients reconnect), and this returns
/// once every connection has closed. Removing the socket file is the
/// caller's job.
pub async fn serve(
    listener: UnixListener,
    provider: Arc<dyn IdentityProvider>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), String> {
    let (stop_tx, stop_rx) = watch::channel(false);
    let server = WorkloadApiServer {
        shared: Arc::new(Shared {
            provider,
            stop: stop_rx.clone(),
        }),
    };
    let (conn_tx, conn_rx) = mpsc::channel(16);
    tokio::spawn(accept_loop(listener, conn_tx, stop_rx));
    let signal = async move {
        shutdown.await;
        let _ = stop_tx.send(true);
    };
    tonic::transport::Server::builder()
        .max_concurrent_streams(MAX_STREAMS_PER_CONNECTION)
        .serve_with_incoming_shutdown(server, ReceiverStream::new(conn_rx), signal)
        .await
        .map_err(|e| format!("workload API server failed: {e}"))
}

/// Accepts connections and hands them to tonic. Unlike feeding the listener
/// in directly, a failed `accept` (EMFILE, ENFILE) backs off instead of
/// spinning. Ends, closing the listener, at shutdown.
async fn accept_loop(
    listener: UnixListener,
    conns: mpsc::Sender<std::io::Result<uds_authority::Conn>>,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    if conns.send(Ok(uds_authority::Conn::new(stream))).await.is_err() {
                        return;
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "workload API: accepting a connection failed");
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                }
            },
            _ = stop.changed() => return,
            _ = conns.closed() => return,
        }
    }
}

/// The hand-written tonic service: checks the security header, then routes
/// by path to [`Grpc`] with the prost codec.
#[derive(Clone)]
struct WorkloadApiServer {
    shared: Arc<Shared>,
}

struct Shared {
    provider: Arc<dyn IdentityProvider>,
    /// Becomes `true` (or closes) at shutdown; ends open streams.
    stop: watch::Receiver<bool>,
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;
type MessageStream<M> = ReceiverStream<Result<M, Status>>;

impl NamedService for WorkloadApiServer {
    const NAME: &'static str = SERVICE_NAME;
}

impl tower_service::Service<http::Request<tonic::body::Body>> for WorkloadApiServer {
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = BoxFuture<Result<Self::Response, Infallible>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<tonic::body::Body>) -> Self::Future {
        let shared = Arc::clone(&self.shared);
        Box::pin(async move { Ok(shared.dispatch(req).await) })
    }
}

fn grpc<Enc, Dec>() -> Grpc<ProstCodec<Enc, Dec>>
where
    Enc: prost::Message + Send + 'static,
    Dec: prost::Message + Default + Send + 'static,
{
    Grpc::new(ProstCodec::default()).max_decoding_message_size(MAX_REQUEST_BYTES)
}

fn has_security_header(headers: &http::HeaderMap) -> bool {
    headers
        .get(SECURITY_HEADER)
        .is_some_and(|v| v.as_bytes() == b"true")
}

impl Shared {
    async fn dispatch(
        self: Arc<Self>,
        req: http::Request<tonic::body::Body>,
    ) -> http::Response<tonic::body::Body> {
        let path = req.uri().path();
        let known = [
            PATH_FETCH_X509_SVID,
            PATH_FETCH_X509_BUNDLES,
            PATH_FETCH_JWT_SVID,
            PATH_FETCH_JWT_BUNDLES,
            PATH_VALIDATE_JWT_SVID,
        ];
        if !known.contains(&path) {
            tracing::debug!(path, "workload API: unknown method");
            return Status::unimplemented(format!("unknown method {path}")).into_http();
        }
        if !has_security_header(req.headers()) {
            tracing::debug!(path, "workload API: request without the security header");
            return Status::invalid_argument("security header missing from request").into_http();
        }
        match path {
            PATH_FETCH_X509_SVID => {
                let svc = StreamMethod(self, |me, r: Request<X509SvidRequest>| {
                    Box::pin(me.open_stream(r, "FetchX509SVID", x509_svid_response))
                });
                grpc().server_streaming(svc, req).await
            }
            PATH_FETCH_X509_BUNDLES => {
                let svc = StreamMethod(self, |me, r: Request<X509BundlesRequest>| {
                    Box::pin(me.open_stream(r, "FetchX509Bundles", x509_bundles_response))
                });
                grpc().server_streaming(svc, req).await
            }
            PATH_FETCH_JWT_BUNDLES => {
                let svc = StreamMethod(self, |me, r: Request<JwtBundlesRequest>| {
                    Box::pin(me.open_stream(r, "FetchJWTBundles", jwt_bundles_response))
                });
                grpc().server_streaming(svc, req).await
            }
            PATH_FETCH_JWT_SVID => {
                let svc = UnaryMethod(self, |me, r| Box::pin(me.fetch_jwt_svid(r)));
                grpc().unary(svc, req).await
            }
            _ => {
                let svc = UnaryMethod(self, |me, r| Box::pin(me.validate_jwt_svid(r)));
                grpc().unary(svc, req).await
            }
        }
    }

    /// Runs a provider call on the blocking pool.
    async fn call_provider<T, F>(&self, caller: CallerCred, f: F) -> Result<T, Status>
    where
        T: Send + 'static,
        F: FnOnce(&dyn IdentityProvider, &CallerCred) -> Result<T, Status> + Send + 'static,
    {
        let provider = Arc::clone(&self.provider);
        tokio::task::spawn_blocking(move || f(provider.as_ref(), &caller))
            .await
            .map_err(|_| {
                tracing::error!("workload API: the identity provider panicked");
                Status::internal("internal error in the identity provider; see the warden log")
            })?
    }

    async fn fetch_jwt_svid(
        self: Arc<Self>,
        req: Request<JwtSvidRequest>,
    ) -> Result<Response<JwtSvidResponse>, Status> {
        let caller = caller_of(&req)?;
        let req = req.into_inner();
        if req.audience.is_empty() || req.audience.iter().any(String::is_empty) {
            return Err(Status::invalid_argument("audience must be specified"));
        }
        let svids = self
            .call_provider(caller, move |p, c| {
                let wanted = Some(req.spiffe_id.as_str()).filter(|s| !s.is_empty());
                p.jwt_svids(c, &req.audience, wanted).map_err(to_status)
            })
            .await?;
        if svids.is_empty() {
            return Err(Status::permission_denied(NO_IDENTITY));
        }
        tracing::debug!(
            pid = ?caller.pid,
            uid = caller.uid,
            count = svids.len(),
            "workload API: issued JWT-SVIDs"
        );
        let svids = svids
            .into_iter()
            .map(|(spiffe_id, svid)| JwtSvid {
                spiffe_id,
                svid,
                hint: String::new(),
            })
            .collect();
        Ok(Response::new(JwtSvidResponse { svids }))
    }

    async fn validate_jwt_svid(
        self: Arc<Self>,
        req: Request<ValidateJwtSvidRequest>,
    ) -> Result<Response<ValidateJwtSvidResponse>, Status> {
        let caller = caller_of(&req)?;
        let req = req.into_inner();
        if req.audience.is_empty() {
            return Err(Status::invalid_argument("audience must be specified"));
        }
        if req.svid.is_empty() {
            return Err(Status::invalid_argument("svid must be specified"));
        }
        let (spiffe_id, claims) = self
            .call_provider(caller, move |p, c| {
                p.validate_jwt(c, &req.audience, &req.svid)
                    .map_err(to_status)
            })
            .await?;
        Ok(Response::new(ValidateJwtSvidResponse {
            spiffe_id,
            claims: Some(json_object_to_struct(claims)),
        }))
    }

    /// Opens a server stream: the first message is computed now (a failure
    /// fails the call), later ones by a task that wakes on provider updates,
    /// client disconnect and shutdown.
    async fn open_stream<Req, M>(
        self: Arc<Self>,
        req: Request<Req>,
        op: &'static str,
        produce: fn(&dyn IdentityProvider, &CallerCred) -> Result<M, Status>,
    ) -> Result<Response<MessageStream<M>>, Status>
    where
        M: Clone + PartialEq + Send + 'static,
    {
        let caller = caller_of(&req)?;
        drop(req);
        let mut updates = self.provider.updates();
        updates.borrow_and_update();
        let first = self.call_provider(caller, produce).await?;
        let (tx, rx) = mpsc::channel(4);
        if tx.try_send(Ok(first.clone())).is_err() {
            return Err(Status::internal("stream could not be started"));
        }
        let mut stop = self.stop.clone();
        let open = self.provider.stream_opened(op);
        tokio::spawn(async move {
            let _open = open;
            let mut last = first;
            loop {
                tokio::select! {
                    changed = updates.changed() => {
                        if changed.is_err() {
                            let _ = tx.send(Err(Status::unavailable("identity updates stopped; reconnect"))).await;
                            return;
                        }
                    }
                    _ = stop.changed() => {
                        let _ = tx.send(Err(Status::unavailable("the workload API is shutting down"))).await;
                        return;
                    }
                    _ = tx.closed() => return,
                }
                match self.call_provider(caller, produce).await {
                    Ok(msg) if msg == last => {}
                    Ok(msg) => {
                        last = msg.clone();
                        if tx.send(Ok(msg)).await.is_err() {
                            return;
                        }
                    }
                    Err(status) => {
                        tracing::info!(
                            pid = ?caller.pid,
                            uid = caller.uid,
                            code = ?status.code(),
                            "workload API: ending a stream"
                        );
                        let _ = tx.send(Err(status)).await;
                        return;
                    }
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

type Handler<M1, R> = fn(Arc<Shared>, Request<M1>) -> BoxFuture<Result<Response<R>, Status>>;

/// One unary method as tonic's [`UnaryService`].
struct UnaryMethod<M1, M2>(Arc<Shared>, Handler<M1, M2>);

impl<M1, M2> UnaryService<M1> for UnaryMethod<M1, M2> {
    type Response = M2;
    type Future = BoxFuture<Result<Response<M2>, Status>>;

    fn call(&mut self, request: Request<M1>) -> Self::Future {
        (self.1)(Arc::clone(&self.0), request)
    }
}

/// One server-streaming method as tonic's [`ServerStreamingService`].
struct StreamMethod<M1, M2>(Arc<Shared>, Handler<M1, MessageStream<M2>>);

impl<M1, M2> ServerStreamingService<M1> for StreamMethod<M1, M2> {
    type Response = M2;
    type ResponseStream = MessageStream<M2>;
    type Future = BoxFuture<Result<Response<MessageStream<M2>>, Status>>;

    fn call(&mut self, request: Request<M1>) -> Self::Future {
        (self.1)(Arc::clone(&self.0), request)
    }
}

/// The caller's credentials, as the kernel reported them for this
/// connection. Without them nobody is served.
fn caller_of<T>(req: &Request<T>) -> Result<CallerCred, Status> {
    let cred = req
        .extensions()
        .get::<UdsConnectInfo>()
        .and_then(|info| info.peer_cred)
        .ok_or_else(|| {
            Status::permission_denied("the caller's process credentials could not be read")
        })?;
    Ok(CallerCred {
        pid: cred
            .pid()
            .and_then(|p| u32::try_from(p).ok())
            .filter(|p| *p != 0),
        uid: cred.uid(),
        gid: cred.gid(),
    })
}

fn to_status(e: IdentityError) -> Status {
    match e {
        IdentityError::PermissionDenied(m) => Status::permission_denied(m),
        IdentityError::Unavailable(m) => Status::unavailable(m),
        IdentityError::InvalidArgument(m) => Status::invalid_argument(m),
        IdentityError::Internal(m) => {
            tracing::error!(error = %m, "workload API: identity provider failed");
            Status::internal("internal error in the identity provider; see the warden log")
        }
    }
}

/// Bundle map key: the trust domain's SPIFFE ID, `spiffe://<td>`.
fn trust_domain_key(td: &str) -> String {
    if td.starts_with("spiffe://") {
        td.to_string()
    } else {
        format!("spiffe://{td}")
    }
}

/// `spiffe://<td>` of a SPIFFE ID (`spiffe://td/path`).
fn trust_domain_of(spiffe_id: &str) -> String {
    let rest = spiffe_id.strip_prefix("spiffe://").unwrap_or(spiffe_id);
    let td = rest.split('/').next().unwrap_or(rest);
    trust_domain_key(td)
}

fn x509_svid_response(
    p: &dyn IdentityProvider,
    caller: &CallerCred,
) -> Result<X509SvidResponse, Status> {
    let materials = p.x509_svids(caller).map_err(to_status)?;
    if materials.is_empty() {
        return Err(Status::permission_denied(NO_IDENTITY));
    }
    let mut svids = Vec::with_capacity(materials.len());
    for m in materials {
        if m.spiffe_id.is_empty()
            || m.cert_chain_der.is_empty()
            || m.key_pkcs8_der.is_empty()
            || m.bundle_der.is_empty()
        {
            return Err(to_status(IdentityError::Internal(format!(
                "incomplete X.509-SVID material for {:?} (empty ID, chain, key or bundle)",
                m.spiffe_id
            ))));
        }
        svids.push(X509Svid {
            x509_svid: m.cert_chain_der.concat(),
            x509_svid_key: m.key_pkcs8_der.to_vec(),
            bundle: m.bundle_der.concat(),
            spiffe_id: m.spiffe_id,
            hint: m.hint,
        });
    }
    // Bundles of trust domains other than the SVIDs' own are federated ones.
    let own: Vec<String> = svids
        .iter()
        .map(|s| trust_domain_of(&s.spiffe_id))
        .collect();
    let federated_bundles = p
        .x509_bundles(caller)
        .map_err(to_status)?
        .into_iter()
        .map(|(td, certs)| (trust_domain_key(&td), certs.concat()))
        .filter(|(td, _)| !own.contains(td))
        .collect();
    Ok(X509SvidResponse {
        svids,
        crl: Vec::new(),
        federated_bundles,
    })
}

fn x509_bundles_response(
    p: &dyn IdentityProvider,
    caller: &CallerCred,
) -> Result<X509BundlesResponse, Status> {
    let bundles: BTreeMap<String, Vec<u8>> = p
        .x509_bundles(caller)
        .map_err(to_status)?
        .into_iter()
        .map(|(td, certs)| (trust_domain_key(&td), certs.concat()))
        .collect();
    if bundles.is_empty() {
        return Err(Status::permission_denied(NO_IDENTITY));
    }
    Ok(X509BundlesResponse {
        crl: Vec::new(),
        bundles,
    })
}

fn jwt_bundles_response(
    p: &dyn IdentityProvider,
    caller: &CallerCred,
) -> Result<JwtBundlesResponse, Status> {
    let bundles: BTreeMap<String, Vec<u8>> = p
        .jwt_bundles(caller)
        .map_err(to_status)?
        .into_iter()
        .map(|(td, jwks)| (trust_domain_key(&td), jwks))
        .collect();
    if bundles.is_empty() {
        return Err(Status::permission_denied(NO_IDENTITY));
    }
    Ok(JwtBundlesResponse { bundles })
}

fn json_object_to_struct(map: serde_json::Map<String, serde_json::Value>) -> prost_types::Struct {
    prost_types::Struct {
        fields: map
            .into_iter()
            .map(|(k, v)| (k, json_to_value(v)))
            .collect(),
    }
}

fn json_to_value(v: serde_json::Value) -> prost_types::Value {
    use prost_types::value::Kind;
    use serde_json::Value as J;
    let kind = match v {
        J::Null => Kind::NullValue(prost_types::NullValue::NullValue as i32),
        J::Bool(b) => Kind::BoolValue(b),
        J::Number(n) => Kind::NumberValue(n.as_f64().unwrap_or(f64::NAN)),
        J::String(s) => Kind::StringValue(s),
        J::Array(items) => Kind::ListValue(prost_types::ListValue {
            values: items.into_iter().map(json_to_value).collect(),
        }),
        J::Object(map) => Kind::StructValue(json_object_to_struct(map)),
    };
    prost_types::Value { kind: Some(kind) }
}

/// Makes requests from gRPC C-core (grpcio, so py-spiffe), grpc-java and
/// grpc-swift acceptable to tonic over a Unix socket.
///
/// Those clients send the socket path, percent-encoded, as the HTTP/2
/// `:authority` (e.g. `tmp%2Fagent.sock`). That is no valid URI authority, so
/// the HTTP/2 layer under tonic (h2) resets every such request with
/// `PROTOCOL_ERROR` before any handler runs, and h2 has no switch to relax it.
/// [`Conn`] sits between the socket and h2 and rewrites, in the client's
/// request headers only, an `:authority` h2 would refuse to `localhost`.
///
/// How: HTTP/2 frames from the client are passed on byte for byte, except
/// header blocks (HEADERS + CONTINUATION). Those are decoded with an HPACK
/// decoder that mirrors the client's compression state (RFC 7541) and
/// re-encoded as plain literals that never touch h2's dynamic table, so both
/// sides' tables stay consistent whatever the client indexes. Nothing else
/// changes: the server's bytes, the peer credentials, every other header. If
/// the input is not HTTP/2, or is malformed in a way this layer cannot
/// follow, it stops rewriting and hands h2 the original bytes, which then
/// fails exactly as it would have without this layer.
mod uds_authority {
    use std::collections::VecDeque;
    use std::io;
    use std::pin::Pin;
    use std::task::{ready, Context, Poll};

    use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
    use tokio::net::UnixStream;
    use tonic::transport::server::{Connected, UdsConnectInfo};

    const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
    const FRAME_HEADER_LEN: usize = 9;
    /// The server's SETTINGS_MAX_FRAME_SIZE (h2's default, which tonic keeps).
    const MAX_FRAME_LEN: usize = 16_384;
    /// Largest header block (compressed, or decoded) this layer handles.
    const MAX_HEADER_BLOCK: usize = 64 * 1024;
    /// The server's SETTINGS_HEADER_TABLE_SIZE (the HTTP/2 default).
    const MAX_TABLE_SIZE: usize = 4096;
    const REPLACEMENT_AUTHORITY: &[u8] = b"localhost";

    const TYPE_HEADERS: u8 = 0x1;
    const TYPE_CONTINUATION: u8 = 0x9;
    const FLAG_END_HEADERS: u8 = 0x4;
    const FLAG_PADDED: u8 = 0x8;
    const FLAG_PRIORITY: u8 = 0x20;

    /// An accepted connection, with client header blocks repaired on read.
    pub(super) struct Conn {
        io: UnixStream,
        rewriter: Rewriter,
        out: Vec<u8>,
        out_pos: usize,
        eof: bool,
    }

    impl Conn {
        pub(super) fn new(io: UnixStream) -> Conn {
            Conn {
                io,
                rewriter: Rewriter::new(),
                out: Vec::new(),
                out_pos: 0,
                eof: false,
            }
        }
    }

    impl Connected for Conn {
        type ConnectInfo = UdsConnectInfo;

        fn connect_info(&self) -> UdsConnectInfo {
            self.io.connect_info()
        }
    }

    impl AsyncRead for Conn {
        fn poll_read(
            self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            let this = self.get_mut();
            loop {
                if this.out_pos < this.out.len() {
                    let n = (this.out.len() - this.out_pos).min(buf.remaining());
                    buf.put_slice(&this.out[this.out_pos..this.out_pos + n]);
                    this.out_pos += n;
                    if this.out_pos == this.out.len() {
                        this.out.clear();
                        this.out_pos = 0;
                    }
                    return Poll::Ready(Ok(()));
                }
                if this.eof {
                    return Poll::Ready(Ok(()));
                }
                let mut chunk = [0u8; 8192];
                let mut chunk_buf = ReadBuf::new(&mut chunk);
                ready!(Pin::new(&mut this.io).poll_read(cx, &mut chunk_buf))?;
                let got = chunk_buf.filled();
                if got.is_empty() {
                    this.eof = true;
                    this.rewriter.finish(&mut this.out);
                } else {
                    this.rewriter.feed(got, &mut this.out);
                }
            }
        }
    }

    impl AsyncWrite for Conn {
        fn poll_write(
            self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
        }

        fn poll_write_vectored(
            self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            bufs: &[io::IoSlice<'_>],
        ) -> Poll<io::Result<usize>> {
            Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
        }

        fn is_write_vectored(&self) -> bool {
            self.io.is_write_vectored()
        }

        fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Pin::new(&mut self.get_mut().io).poll_flush(cx)
        }

        fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
        }
    }

    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    enum Mode {
        Preface,
        Frames,
        Passthrough,
    }

    /// A header block being collected across HEADERS and CONTINUATION.
    struct Pending {
        stream_id: u32,
        flags: u8,
        priority: Option<[u8; 5]>,
        block: Vec<u8>,
        /// The frames as received, for handing over unchanged.
        original: Vec<u8>,
    }

    /// The client-to-server byte stream transformer (no I/O of its own).
    pub(super) struct Rewriter {
        mode: Mode,
        raw: Vec<u8>,
        pending: Option<Pending>,
        decoder: Decoder,
    }

    impl Rewriter {
        pub(super) fn new() -> Rewriter {
            Rewriter {
                mode: Mode::Preface,
                raw: Vec::new(),
                pending: None,
                decoder: Decoder::new(),
            }
        }

        /// Takes bytes from the client; appends what h2 should read to `out`.
        pub(super) fn feed(&mut self, input: &[u8], out: &mut Vec<u8>) {
            self.raw.extend_from_slice(input);
            loop {
                match self.mode {
                    Mode::Passthrough => {
                        out.append(&mut self.raw);
                        return;
                    }
                    Mode::Preface => {
                        let n = self.raw.len().min(PREFACE.len());
                        if self.raw[..n] != PREFACE[..n] {
                            self.mode = Mode::Passthrough;
                            continue;
                        }
                        if n < PREFACE.len() {
                            return;
                        }
                        out.extend(self.raw.drain(..PREFACE.len()));
                        self.mode = Mode::Frames;
                    }
                    Mode::Frames => {
                        let Some(header) = self.raw.get(..FRAME_HEADER_LEN) else {
                            return;
                        };
                        let len = (usize::from(header[0]) << 16)
                            | (usize::from(header[1]) << 8)
                            | usize::from(header[2]);
                        if len > MAX_FRAME_LEN {
                            // h2 refuses it anyway; do not buffer it.
                            self.give_up(Vec::new(), out);
                            continue;
                        }
                        if self.raw.len() < FRAME_HEADER_LEN + len {
                            return;
                        }
                        let frame: Vec<u8> = self.raw.drain(..FRAME_HEADER_LEN + len).collect();
                        if let Err(unsent) = self.frame(frame, out) {
                            self.give_up(unsent, out);
                        }
                    }
                }
            }
        }

        /// The client closed its side: hand over whatever is left.
        pub(super) fn finish(&mut self, out: &mut Vec<u8>) {
            self.give_up(Vec::new(), out);
            out.append(&mut self.raw);
        }

        /// Stops rewriting: what was held back goes out unchanged, in order.
        fn give_up(&mut self, unsent: Vec<u8>, out: &mut Vec<u8>) {
            if let Some(p) = self.pending.take() {
                out.extend_from_slice(&p.original);
            }
            out.extend_from_slice(&unsent);
            self.mode = Mode::Passthrough;
        }

        /// One complete frame. `Err` carries bytes to hand over unchanged
        /// (besides any pending block) before passing everything through.
        fn frame(&mut self, frame: Vec<u8>, out: &mut Vec<u8>) -> Result<(), Vec<u8>> {
            let kind = frame[3];
            let flags = frame[4];
            let stream_id =
                u32::from_be_bytes([frame[5], frame[6], frame[7], frame[8]]) & 0x7fff_ffff;
            match (kind, self.pending.as_mut()) {
                (TYPE_HEADERS, None) => {
                    let Some((priority, fragment)) = headers_fragment(flags, &frame) else {
                        return Err(frame);
                    };
                    let pending = Pending {
                        stream_id,
                        flags,
                        priority,
                        block: fragment.to_vec(),
                        original: frame,
                    };
                    if flags & FLAG_END_HEADERS != 0 {
                        self.emit(pending, out)
                    } else {
                        self.pending = Some(pending);
                        Ok(())
                    }
                }
                (TYPE_CONTINUATION, Some(p)) if p.stream_id == stream_id => {
                    let fragment = &frame[FRAME_HEADER_LEN..];
                    if p.block.len() + fragment.len() > MAX_HEADER_BLOCK {
                        return Err(frame);
                    }
                    p.block.extend_from_slice(fragment);
                    p.original.extend_from_slice(&frame);
                    if flags & FLAG_END_HEADERS != 0 {
                        match self.pending.take() {
                            Some(p) => self.emit(p, out),
                            None => Ok(()),
                        }
                    } else {
                        Ok(())
                    }
                }
                // Anything else inside a header block is a protocol error
                // that h2 will report; a lone frame passes as it is.
                (_, Some(_)) => Err(frame),
                (_, None) => {
                    out.extend_from_slice(&frame);
                    Ok(())
                }
            }
        }

        /// Decodes a complete header block and writes it out re-encoded.
        fn emit(&mut self, p: Pending, out: &mut Vec<u8>) -> Result<(), Vec<u8>> {
            let Ok(headers) = self.decoder.decode(&p.block) else {
                return Err(p.original);
            };
            let mut block = Vec::with_capacity(p.block.len() * 2);
            for h in &headers {
                let value = if h.name == b":authority" && !valid_authority(&h.value) {
                    tracing::debug!("workload API: replaced a socket-path :authority");
                    REPLACEMENT_AUTHORITY
                } else {
                    h.value.as_slice()
                };
                encode_literal(&mut block, &h.name, value, h.never_indexed);
            }
            write_header_frames(p.stream_id, p.flags, p.priority, &block, out);
            Ok(())
        }
    }

    fn valid_authority(value: &[u8]) -> bool {
        http::uri::Authority::try_from(value).is_ok()
    }

    /// The header block fragment of a HEADERS frame, without padding and
    /// priority fields; `None` if those do not fit.
    fn headers_fragment(flags: u8, frame: &[u8]) -> Option<(Option<[u8; 5]>, &[u8])> {
        let mut payload = frame.get(FRAME_HEADER_LEN..)?;
        if flags & FLAG_PADDED != 0 {
            let (&pad, rest) = payload.split_first()?;
            payload = rest.get(..rest.len().checked_sub(usize::from(pad))?)?;
        }
        let mut priority = None;
        if flags & FLAG_PRIORITY != 0 {
            let fields = payload.get(..5)?;
            priority = Some([fields[0], fields[1], fields[2], fields[3], fields[4]]);
            payload = payload.get(5..)?;
        }
        Some((priority, payload))
    }

    /// Writes `block` as a HEADERS frame (same END_STREAM and priority, no
    /// padding) plus CONTINUATION frames as needed.
    fn write_header_frames(
        stream_id: u32,
        flags: u8,
        priority: Option<[u8; 5]>,
        block: &[u8],
        out: &mut Vec<u8>,
    ) {
        let keep = flags & !(FLAG_PADDED | FLAG_END_HEADERS);
        let first_room = MAX_FRAME_LEN - if priority.is_some() { 5 } else { 0 };
        let (first, mut rest) = block.split_at(block.len().min(first_room));
        let mut frame_flags = keep;
        if rest.is_empty() {
            frame_flags |= FLAG_END_HEADERS;
        }
        let prio_len = if priority.is_some() { 5 } else { 0 };
        push_frame_header(
            out,
            first.len() + prio_len,
            TYPE_HEADERS,
            frame_flags,
            stream_id,
        );
        if let Some(p) = priority {
            out.extend_from_slice(&p);
        }
        out.extend_from_slice(first);
        while !rest.is_empty() {
            let (chunk, tail) = rest.split_at(rest.len().min(MAX_FRAME_LEN));
            let flags = if tail.is_empty() { FLAG_END_HEADERS } else { 0 };
            push_frame_header(out, chunk.len(), TYPE_CONTINUATION, flags, stream_id);
            out.extend_from_slice(chunk);
            rest = tail;
        }
    }

    fn push_frame_header(out: &mut Vec<u8>, len: usize, kind: u8, flags: u8, stream_id: u32) {
        // len <= MAX_FRAME_LEN, so three bytes hold it.
        out.extend_from_slice(&[(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags]);
        out.extend_from_slice(&stream_id.to_be_bytes());
    }

    /// A literal header field without indexing (or never indexed), new name,
    /// no Huffman coding: it leaves the receiver's dynamic table alone.
    fn encode_literal(out: &mut Vec<u8>, name: &[u8], value: &[u8], never_indexed: bool) {
        out.push(if never_indexed { 0x10 } else { 0x00 });
        encode_int(out, 0, 7, name.len());
        out.extend_from_slice(name);
        encode_int(out, 0, 7, value.len());
        out.extend_from_slice(value);
    }

    /// RFC 7541 §5.1 integer with an `n`-bit prefix; `first` holds the bits
    /// above the prefix.
    fn encode_int(out: &mut Vec<u8>, first: u8, n: u32, value: usize) {
        let max = (1usize << n) - 1;
        if value < max {
            out.push(first | value as u8);
            return;
        }
        out.push(first | max as u8);
        let mut rest = value - max;
        while rest >= 0x80 {
            out.push((rest & 0x7f) as u8 | 0x80);
            rest >>= 7;
        }
        out.push(rest as u8);
    }

    #[derive(Debug, Clone, PartialEq, Eq)]
    pub(super) struct Header {
        pub(super) name: Vec<u8>,
        pub(super) value: Vec<u8>,
        pub(super) never_indexed: bool,
    }

    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub(super) struct HpackError;

    /// An HPACK decoder (RFC 7541) with its dynamic table.
    pub(super) struct Decoder {
        table: VecDeque<(Vec<u8>, Vec<u8>)>,
        size: usize,
        max_size: usize,
    }

    impl Decoder {
        pub(super) fn new() -> Decoder {
            Decoder {
                table: VecDeque::new(),
                size: 0,
                max_size: MAX_TABLE_SIZE,
            }
        }

        pub(super) fn decode(&mut self, block: &[u8]) -> Result<Vec<Header>, HpackError> {
            let mut cur = Cursor { buf: block, pos: 0 };
            let mut headers = Vec::new();
            let mut decoded_len = 0usize;
            while let Some(&first) = cur.peek() {
                let header = if first & 0x80 != 0 {
                    let index = cur.int(7)?;
                    let (name, value) = self.lookup(index)?;
                    Header {
                        name,
                        value,
                        never_indexed: false,
                    }
                } else if first & 0x40 != 0 {
                    let (name, value) = self.literal(&mut cur, 6)?;
                    self.insert(name.clone(), value.clone());
                    Header {
                        name,
                        value,
                        never_indexed: false,
                    }
                } else if first & 0x20 != 0 {
                    let new_max = cur.int(5)?;
                    if new_max > MAX_TABLE_SIZE {
                        return Err(HpackError);
                    }
                    self.max_size = new_max;
                    self.evict();
                    continue;
                } else {
                    let never_indexed = first & 0x10 != 0;
                    let (name, value) = self.literal(&mut cur, 4)?;
                    Header {
                        name,
                        value,
                        never_indexed,
                    }
                };
                decoded_len += header.name.len() + header.value.len() + 32;
                if decoded_len > MAX_HEADER_BLOCK {
                    return Err(HpackError);
                }
                headers.push(header);
            }
            Ok(headers)
        }

        fn literal(
            &self,
            cur: &mut Cursor<'_>,
            prefix: u32,
        ) -> Result<(Vec<u8>, Vec<u8>), HpackError> {
            let name_index = cur.int(prefix)?;
            let name = if name_index == 0 {
                cur.string()?
            } else {
                self.lookup(name_index)?.0
            };
            Ok((name, cur.string()?))
        }

        fn lookup(&self, index: usize) -> Result<(Vec<u8>, Vec<u8>), HpackError> {
            if index == 0 {
                return Err(HpackError);
            }
            if let Some(&(name, value)) = STATIC_TABLE.get(index - 1) {
                return Ok((name.as_bytes().to_vec(), value.as_bytes().to_vec()));
            }
            self.table
                .get(index - 1 - STATIC_TABLE.len())
                .cloned()
                .ok_or(HpackError)
        }

        fn insert(&mut self, name: Vec<u8>, value: Vec<u8>) {
            let entry = name.len() + value.len() + 32;
            if entry > self.max_size {
                self.table.clear();
                self.size = 0;
                return;
            }
            self.size += entry;
            self.table.push_front((name, value));
            self.evict();
        }

        fn evict(&mut self) {
            while self.size > self.max_size {
                match self.table.pop_back() {
                    Some((n, v)) => self.size -= n.len() + v.len() + 32,
                    None => {
                        self.size = 0;
                        break;
                    }
                }
            }
        }
    }

    struct Cursor<'a> {
        buf: &'a [u8],
        pos: usize,
    }

    impl Cursor<'_> {
        fn peek(&self) -> Option<&u8> {
            self.buf.get(self.pos)
        }

        fn byte(&mut self) -> Result<u8, HpackError> {
            let b = *self.buf.get(self.pos).ok_or(HpackError)?;
            self.pos += 1;
            Ok(b)
        }

        /// RFC 7541 §5.1 integer with an `n`-bit prefix (bounded to 2^21).
        fn int(&mut self, n: u32) -> Result<usize, HpackError> {
            let max = (1usize << n) - 1;
            let mut value = usize::from(self.byte()?) & max;
            if value < max {
                return Ok(value);
            }
            let mut shift = 0;
            loop {
                let b = self.byte()?;
                value += usize::from(b & 0x7f) << shift;
                if b & 0x80 == 0 {
                    return Ok(value);
                }
                shift += 7;
                if shift > 14 {
                    return Err(HpackError);
                }
            }
        }

        /// RFC 7541 §5.2 string literal, Huffman-decoded if flagged.
        fn string(&mut self) -> Result<Vec<u8>, HpackError> {
            let huffman = self.peek().is_some_and(|b| b & 0x80 != 0);
            let len = self.int(7)?;
            let end = self.pos.checked_add(len).ok_or(HpackError)?;
            let bytes = self.buf.get(self.pos..end).ok_or(HpackError)?;
            self.pos = end;
            if huffman {
                huffman_decode(bytes)
            } else {
                Ok(bytes.to_vec())
            }
        }
    }

    /// Decodes RFC 7541 Huffman coding. The code is canonical, so it follows
    /// from the code lengths alone: within each length, codes are consecutive
    /// in symbol order, and each length's first code continues the previous.
    pub(super) fn huffman_decode(input: &[u8]) -> Result<Vec<u8>, HpackError> {
        let mut out = Vec::with_capacity(input.len() * 8 / 5);
        let mut code: u32 = 0;
        let mut len: u32 = 0;
        for byte in input {
            for shift in (0..8).rev() {
                code = (code << 1) | u32::from((byte >> shift) & 1);
                len += 1;
                if let Some(symbol) = huffman_symbol(code, len) {
                    // EOS (256) must never appear inside a string.
                    out.push(u8::try_from(symbol).map_err(|_| HpackError)?);
                    code = 0;
                    len = 0;
                } else if len >= 30 {
                    return Err(HpackError);
                }
            }
        }
        // Padding: fewer than 8 bits, all ones (a prefix of EOS).
        if len > 7 || code != (1 << len) - 1 {
            return Err(HpackError);
        }
        Ok(out)
    }

    /// The symbol whose code is the `len`-bit `code`, if any.
    fn huffman_symbol(code: u32, len: u32) -> Option<u16> {
        let mut first: u32 = 0;
        let mut prev_len: u32 = 0;
        for &(group_len, symbols) in HUFFMAN_SYMBOLS_BY_LENGTH {
            first <<= group_len - prev_len;
            if group_len == len {
                let offset = code.checked_sub(first)?;
                return symbols.get(usize::try_from(offset).ok()?).copied();
            }
            if group_len > len {
                return None;
            }
            first += symbols.len() as u32;
            prev_len = group_len;
        }
        None
    }

    /// RFC 7541 Appendix B, as (code length, symbols with that length in
    /// ascending order); 256 is EOS.
    const HUFFMAN_SYMBOLS_BY_LENGTH: &[(u32, &[u16])] = &[
        (5, &[48, 49, 50, 97, 99, 101, 105, 111, 115, 116]),
        (
            6,
            &[
                32, 37, 45, 46, 47, 51, 52, 53, 54, 55, 56, 57, 61, 65, 95, 98, 100, 102, 103, 104,
                108, 109, 110, 112, 114, 117,
            ],
        ),
        (
            7,
            &[
                58, 66, 67, 68, 69, 70, 71, 72, 73, 74, 75, 76, 77, 78, 79, 80, 81, 82, 83, 84, 85,
                86, 87, 89, 106, 107, 113, 118, 119, 120, 121, 122,
            ],
        ),
        (8, &[38, 42, 44, 59, 88, 90]),
        (10, &[33, 34, 40, 41, 63]),
        (11, &[39, 43, 124]),
        (12, &[35, 62]),
        (13, &[0, 36, 64, 91, 93, 126]),
        (14, &[94, 125]),
        (15, &[60, 96, 123]),
        (19, &[92, 195, 208]),
        (20, &[128, 130, 131, 162, 184, 194, 224, 226]),
        (
            21,
            &[
                153, 161, 167, 172, 176, 177, 179, 209, 216, 217, 227, 229, 230,
            ],
        ),
        (
            22,
            &[
                129, 132, 133, 134, 136, 146, 154, 156, 160, 163, 164, 169, 170, 173, 178, 181,
                185, 186, 187, 189, 190, 196, 198, 228, 232, 233,
            ],
        ),
        (
            23,
            &[
                1, 135, 137, 138, 139, 140, 141, 143, 147, 149, 150, 151, 152, 155, 157, 158, 165,
                166, 168, 174, 175, 180, 182, 183, 188, 191, 197, 231, 239,
            ],
        ),
        (
            24,
            &[9, 142, 144, 145, 148, 159, 171, 206, 215, 225, 236, 237],
        ),
        (25, &[199, 207, 234, 235]),
        (
            26,
            &[
                192, 193, 200, 201, 202, 205, 210, 213, 218, 219, 238, 240, 242, 243, 255,
            ],
        ),
        (
            27,
            &[
                203, 204, 211, 212, 214, 221, 222, 223, 241, 244, 245, 246, 247, 248, 250, 251,
                252, 253, 254,
            ],
        ),
        (
            28,
            &[
                2, 3, 4, 5, 6, 7, 8, 11, 12, 14, 15, 16, 17, 18, 19, 20, 21, 23, 24, 25, 26, 27,
                28, 29, 30, 31, 127, 220, 249,
            ],
        ),
        (30, &[10, 13, 22, 256]),
    ];

    /// RFC 7541 Appendix A.
    const STATIC_TABLE: &[(&str, &str)] = &[
        (":authority", ""),
        (":method", "GET"),
        (":method", "POST"),
        (":path", "/"),
        (":path", "/index.html"),
        (":scheme", "http"),
        (":scheme", "https"),
        (":status", "200"),
        (":status", "204"),
        (":status", "206"),
        (":status", "304"),
        (":status", "400"),
        (":status", "404"),
        (":status", "500"),
        ("accept-charset", ""),
        ("accept-encoding", "gzip, deflate"),
        ("accept-language", ""),
        ("accept-ranges", ""),
        ("accept", ""),
        ("access-control-allow-origin", ""),
        ("age", ""),
        ("allow", ""),
        ("authorization", ""),
        ("cache-control", ""),
        ("content-disposition", ""),
        ("content-encoding", ""),
        ("content-language", ""),
        ("content-length", ""),
        ("content-location", ""),
        ("content-range", ""),
        ("content-type", ""),
        ("cookie", ""),
        ("date", ""),
        ("etag", ""),
        ("expect", ""),
        ("expires", ""),
        ("from", ""),
        ("host", ""),
        ("if-match", ""),
        ("if-modified-since", ""),
        ("if-none-match", ""),
        ("if-range", ""),
        ("if-unmodified-since", ""),
        ("last-modified", ""),
        ("link", ""),
        ("location", ""),
        ("max-forwards", ""),
        ("proxy-authenticate", ""),
        ("proxy-authorization", ""),
        ("range", ""),
        ("referer", ""),
        ("refresh", ""),
        ("retry-after", ""),
        ("server", ""),
        ("set-cookie", ""),
        ("strict-transport-security", ""),
        ("transfer-encoding", ""),
        ("user-agent", ""),
        ("vary", ""),
        ("via", ""),
        ("www-authenticate", ""),
    ];

    #[cfg(test)]
    mod tests {
        use super::*;

        fn hex(s: &str) -> Vec<u8> {
            let s: String = s.split_whitespace().collect();
            (0..s.len())
                .step_by(2)
                .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
                .collect()
        }

        fn pairs(headers: &[Header]) -> Vec<(String, String)> {
            headers
                .iter()
                .map(|h| {
                    (
                        String::from_utf8(h.name.clone()).unwrap(),
                        String::from_utf8(h.value.clone()).unwrap(),
                    )
                })
                .collect()
        }

        fn p(list: &[(&str, &str)]) -> Vec<(String, String)> {
            list.iter()
                .map(|(n, v)| (n.to_string(), v.to_string()))
                .collect()
        }

        #[test]
        fn huffman_matches_rfc7541_examples() {
            assert_eq!(
                huffman_decode(&hex("f1e3 c2e5 f23a 6ba0 ab90 f4ff")).unwrap(),
                b"www.example.com"
            );
            assert_eq!(huffman_decode(&hex("a8eb 1064 9cbf")).unwrap(), b"no-cache");
            assert_eq!(
                huffman_decode(&hex("25a8 49e9 5bb8 e8b4 bf")).unwrap(),
                b"custom-value"
            );
            // Padding longer than 7 bits, or not all ones, is an error.
            assert!(huffman_decode(&hex("a8eb 1064 9cbf ff")).is_err());
            assert!(huffman_decode(&hex("a8eb 1064 9cbe")).is_err());
            // Every code length group fits: the last code is all ones.
            let total: u64 = HUFFMAN_SYMBOLS_BY_LENGTH
                .iter()
                .map(|(len, syms)| (syms.len() as u64) << (30 - len))
                .sum();
            assert_eq!(
                total,
                1 << 30,
                "the code lengths do not form a complete code"
            );
            let count: usize = HUFFMAN_SYMBOLS_BY_LENGTH.iter().map(|(_, s)| s.len()).sum();
            assert_eq!(count, 257);
        }

        #[test]
        fn decoder_follows_rfc7541_c4_request_sequence() {
            let mut d = Decoder::new();
            let first = d
                .decode(&hex("8286 8441 8cf1 e3c2 e5f2 3a6b a0ab 90f4 ff"))
                .unwrap();
            assert_eq!(
                pairs(&first),
                p(&[
                    (":method", "GET"),
                    (":scheme", "http"),
                    (":path", "/"),
                    (":authority", "www.example.com")
                ])
            );
            let second = d.decode(&hex("8286 84be 5886 a8eb 1064 9cbf")).unwrap();
            assert_eq!(
                pairs(&second),
                p(&[
                    (":method", "GET"),
                    (":scheme", "http"),
                    (":path", "/"),
                    (":authority", "www.example.com"),
                    ("cache-control", "no-cache")
                ])
            );
            let third = d
                .decode(&hex(
                    "8287 85bf 4088 25a8 49e9 5ba9 7d7f 8925 a849 e95b b8e8 b4bf",
                ))
                .unwrap();
            assert_eq!(
                pairs(&third),
                p(&[
                    (":method", "GET"),
                    (":scheme", "https"),
                    (":path", "/index.html"),
                    (":authority", "www.example.com"),
                    ("custom-key", "custom-value")
                ])
            );
            assert_eq!(d.size, 164);
            assert!(d.decode(&hex("80")).is_err(), "index 0 is invalid");
            assert!(d.decode(&hex("ff 00")).is_err(), "index past the table");
        }

        /// A HEADERS frame with `block`, as a client would send it.
        fn headers_frame(stream: u32, flags: u8, payload: &[u8]) -> Vec<u8> {
            let mut f = Vec::new();
            push_frame_header(&mut f, payload.len(), TYPE_HEADERS, flags, stream);
            f.extend_from_slice(payload);
            f
        }

        /// Splits rewritten output into frames: (type, flags, stream, payload).
        fn frames(mut bytes: &[u8]) -> Vec<(u8, u8, u32, Vec<u8>)> {
            let mut out = Vec::new();
            while !bytes.is_empty() {
                let len = (usize::from(bytes[0]) << 16)
                    | (usize::from(bytes[1]) << 8)
                    | usize::from(bytes[2]);
                let sid = u32::from_be_bytes([bytes[5], bytes[6], bytes[7], bytes[8]]);
                out.push((bytes[3], bytes[4], sid, bytes[9..9 + len].to_vec()));
                bytes = &bytes[9 + len..];
            }
            out
        }

        /// A block with a socket-path authority: literal with incremental
        /// indexing (so the client's table holds it), then a reference to it.
        fn grpc_c_core_like_block(authority: &str) -> Vec<u8> {
            let mut b = vec![0x83, 0x86]; // :method POST, :scheme http
            b.push(0x44); // :path, literal with indexing, name index 4
            encode_int(&mut b, 0, 7, 22);
            b.extend_from_slice(b"/SpiffeWorkloadAPI/Foo");
            b.push(0x41); // :authority, literal with indexing
            encode_int(&mut b, 0, 7, authority.len());
            b.extend_from_slice(authority.as_bytes());
            b.extend_from_slice(&[0x00, 0x04]);
            b.extend_from_slice(b"abcd");
            b.push(0x01);
            b.push(b'x');
            b
        }

        #[test]
        fn socket_path_authority_becomes_localhost() {
            let settings = [0, 0, 0, 4, 0, 0, 0, 0, 0];
            let block = grpc_c_core_like_block("tmp%2Fagent.sock");
            let mut input = PREFACE.to_vec();
            input.extend_from_slice(&settings);
            input.extend(headers_frame(1, FLAG_END_HEADERS, &block));
            // Second request on the connection refers to the indexed entries:
            // 0xbe = newest (:authority), 0xbf = :path.
            input.extend(headers_frame(
                3,
                FLAG_END_HEADERS | 0x1,
                &[0x83, 0x86, 0xbf, 0xbe],
            ));

            // Fed one byte at a time, to exercise every partial state.
            let mut rw = Rewriter::new();
            let mut out = Vec::new();
            for b in &input {
                rw.feed(std::slice::from_ref(b), &mut out);
            }
            assert_eq!(&out[..PREFACE.len()], PREFACE);
            let fs = frames(&out[PREFACE.len()..]);
            assert_eq!(fs.len(), 3);
            assert_eq!(fs[0], (4, 0, 0, Vec::new()), "SETTINGS unchanged");
            let mut server = Decoder::new();
            let (kind, flags, sid, payload) = &fs[1];
            assert_eq!((*kind, *flags, *sid), (TYPE_HEADERS, FLAG_END_HEADERS, 1));
            assert_eq!(
                pairs(&server.decode(payload).unwrap()),
                p(&[
                    (":method", "POST"),
                    (":scheme", "http"),
                    (":path", "/SpiffeWorkloadAPI/Foo"),
                    (":authority", "localhost"),
                    ("abcd", "x")
                ])
            );
            let (kind, flags, sid, payload) = &fs[2];
            assert_eq!(
                (*kind, *flags, *sid),
                (TYPE_HEADERS, FLAG_END_HEADERS | 0x1, 3)
            );
            assert_eq!(
                pairs(&server.decode(payload).unwrap()),
                p(&[
                    (":method", "POST"),
                    (":scheme", "http"),
                    (":path", "/SpiffeWorkloadAPI/Foo"),
                    (":authority", "localhost"),
                ])
            );
            assert!(
                server.table.is_empty(),
                "the server's table must stay unused"
            );
        }

        #[test]
        fn valid_authority_padding_priority_and_continuation() {
            let block = grpc_c_core_like_block("localhost:1234");
            // PADDED + PRIORITY on HEADERS, block split over a CONTINUATION.
            let (a, b) = block.split_at(10);
            let mut payload = vec![3]; // pad length
            payload.extend_from_slice(&[0x80, 0, 0, 1, 7]); // priority
            payload.extend_from_slice(a);
            payload.extend_from_slice(&[0, 0, 0]);
            let mut input = PREFACE.to_vec();
            input.extend(headers_frame(5, FLAG_PADDED | FLAG_PRIORITY, &payload));
            push_frame_header(&mut input, b.len(), TYPE_CONTINUATION, FLAG_END_HEADERS, 5);
            input.extend_from_slice(b);
            let mut rw = Rewriter::new();
            let mut out = Vec::new();
            rw.feed(&input, &mut out);
            let fs = frames(&out[PREFACE.len()..]);
            assert_eq!(fs.len(), 1);
            let (kind, flags, sid, payload) = &fs[0];
            assert_eq!(
                (*kind, *flags, *sid),
                (TYPE_HEADERS, FLAG_PRIORITY | FLAG_END_HEADERS, 5)
            );
            assert_eq!(&payload[..5], &[0x80, 0, 0, 1, 7]);
            let headers = Decoder::new().decode(&payload[5..]).unwrap();
            assert_eq!(
                pairs(&headers)[3],
                p(&[(":authority", "localhost:1234")])[0]
            );
        }

        #[test]
        fn other_protocols_and_broken_frames_pass_through_unchanged() {
            let mut rw = Rewriter::new();
            let mut out = Vec::new();
            rw.feed(b"GET / HTTP/1.1\r\n\r\n", &mut out);
            assert_eq!(out, b"GET / HTTP/1.1\r\n\r\n");

            // An undecodable header block goes to h2 as it came.
            let mut input = PREFACE.to_vec();
            let bad = headers_frame(1, FLAG_END_HEADERS, &[0x80]);
            input.extend_from_slice(&bad);
            input.extend_from_slice(b"trailing");
            let mut rw = Rewriter::new();
            let mut out = Vec::new();
            rw.feed(&input, &mut out);
            assert_eq!(out, input);

            // An oversized frame is not buffered; everything passes on.
            let mut input = PREFACE.to_vec();
            push_frame_header(&mut input, MAX_FRAME_LEN + 1, 0, 0, 1);
            let mut rw = Rewriter::new();
            let mut out = Vec::new();
            rw.feed(&input, &mut out);
            assert_eq!(out, input);

            // A truncated stream is handed over at EOF.
            let mut rw = Rewriter::new();
            let mut out = Vec::new();
            let mut input = PREFACE.to_vec();
            input.extend_from_slice(&[0, 0, 9, 1]);
            rw.feed(&input, &mut out);
            rw.finish(&mut out);
            assert_eq!(out, input);
        }

        #[test]
        fn long_blocks_are_split_into_continuations() {
            let mut block = vec![0x41];
            encode_int(&mut block, 0, 7, 9);
            block.extend_from_slice(b"tmp%2Fsoc");
            let big = "v".repeat(20_000);
            block.push(0x00);
            encode_int(&mut block, 0, 7, 1);
            block.push(b'x');
            encode_int(&mut block, 0, 7, big.len());
            block.extend_from_slice(big.as_bytes());
            let mut input = PREFACE.to_vec();
            input.extend(headers_frame(1, 0, &block[..10_000]));
            push_frame_header(
                &mut input,
                block.len() - 10_000,
                TYPE_CONTINUATION,
                FLAG_END_HEADERS,
                1,
            );
            input.extend_from_slice(&block[10_000..]);
            let mut rw = Rewriter::new();
            let mut out = Vec::new();
            rw.feed(&input, &mut out);
            let fs = frames(&out[PREFACE.len()..]);
            assert_eq!(fs.len(), 2);
            assert_eq!((fs[0].0, fs[0].1), (TYPE_HEADERS, 0));
            assert_eq!((fs[1].0, fs[1].1), (TYPE_CONTINUATION, FLAG_END_HEADERS));
            assert!(fs.iter().all(|f| f.3.len() <= MAX_FRAME_LEN));
            let joined: Vec<u8> = fs.iter().flat_map(|f| f.3.clone()).collect();
            let headers = Decoder::new().decode(&joined).unwrap();
            assert_eq!(headers[0].value, b"localhost");
            assert_eq!(headers[1].value.len(), 20_000);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message;
    use serde_json::json;

    #[test]
    fn field_numbers_match_workload_proto() {
        // X509SVID{spiffe_id=1 "a", x509_svid=2 [1], x509_svid_key=3 [2], bundle=4 [3], hint=5 "h"}
        let svid = X509Svid {
            spiffe_id: "a".into(),
            x509_svid: vec![1],
            x509_svid_key: vec![2],
            bundle: vec![3],
            hint: "h".into(),
        };
        assert_eq!(
            svid.encode_to_vec(),
            [0x0a, 1, b'a', 0x12, 1, 1, 0x1a, 1, 2, 0x22, 1, 3, 0x2a, 1, b'h']
        );
        let resp = X509SvidResponse {
            svids: vec![],
            crl: vec![vec![9]],
            federated_bundles: [("t".to_string(), vec![7])].into(),
        };
        // crl=2 bytes; federated_bundles=3 entry {key=1 "t", value=2 [7]}
        assert_eq!(
            resp.encode_to_vec(),
            [0x12, 1, 9, 0x1a, 6, 0x0a, 1, b't', 0x12, 1, 7]
        );
        let b = X509BundlesResponse {
            crl: vec![vec![9]],
            bundles: [("t".to_string(), vec![7])].into(),
        };
        assert_eq!(
            b.encode_to_vec(),
            [0x0a, 1, 9, 0x12, 6, 0x0a, 1, b't', 0x12, 1, 7]
        );
        let req = JwtSvidRequest {
            audience: vec!["x".into()],
            spiffe_id: "y".into(),
        };
        assert_eq!(req.encode_to_vec(), [0x0a, 1, b'x', 0x12, 1, b'y']);
        let jwt = JwtSvid {
            spiffe_id: "a".into(),
            svid: "b".into(),
            hint: "c".into(),
        };
        assert_eq!(
            jwt.encode_to_vec(),
            [0x0a, 1, b'a', 0x12, 1, b'b', 0x1a, 1, b'c']
        );
        let v = ValidateJwtSvidRequest {
            audience: "a".into(),
            svid: "b".into(),
        };
        assert_eq!(v.encode_to_vec(), [0x0a, 1, b'a', 0x12, 1, b'b']);
        let vr = ValidateJwtSvidResponse {
            spiffe_id: "a".into(),
            claims: Some(prost_types::Struct::default()),
        };
        assert_eq!(vr.encode_to_vec(), [0x0a, 1, b'a', 0x12, 0]);
        let jb = JwtBundlesResponse {
            bundles: [("t".to_string(), vec![7])].into(),
        };
        assert_eq!(jb.encode_to_vec(), [0x0a, 6, 0x0a, 1, b't', 0x12, 1, 7]);
    }

    #[test]
    fn debug_output_hides_keys_and_tokens() {
        let svid = X509Svid {
            spiffe_id: "spiffe://example.org/a".into(),
            x509_svid: vec![1, 2],
            x509_svid_key: b"SECRET-KEY-BYTES".to_vec(),
            bundle: vec![3],
            hint: String::new(),
        };
        let jwt = JwtSvid {
            spiffe_id: "spiffe://example.org/a".into(),
            svid: "eyJTOKEN".into(),
            hint: String::new(),
        };
        let v = ValidateJwtSvidRequest {
            audience: "db".into(),
            svid: "eyJTOKEN".into(),
        };
        let resp = JwtSvidResponse {
            svids: vec![jwt.clone()],
        };
        let all = format!("{svid:?} {jwt:?} {v:?} {resp:?}");
        assert!(!all.contains("83, 69, 67"), "{all}"); // "SEC" as bytes
        assert!(!all.contains("SECRET"), "{all}");
        assert!(!all.contains("eyJTOKEN"), "{all}");
        assert!(all.contains("spiffe://example.org/a"));
        let m = X509SvidMaterial {
            spiffe_id: "spiffe://example.org/a".into(),
            cert_chain_der: vec![vec![1]],
            key_pkcs8_der: Zeroizing::new(b"SECRET".to_vec()),
            bundle_der: vec![vec![2]],
            hint: String::new(),
        };
        assert!(!format!("{m:?}").contains("83, 69"));
    }

    #[test]
    fn claims_become_a_protobuf_struct() {
        use prost_types::value::Kind;
        let claims = json!({
            "sub": "spiffe://example.org/a",
            "aud": ["x", "y"],
            "exp": 1_700_000_000,
            "ok": true,
            "none": null,
            "nested": {"k": 1.5}
        });
        let serde_json::Value::Object(map) = claims else {
            panic!("not an object")
        };
        let s = json_object_to_struct(map);
        let kind = |k: &str| s.fields[k].kind.clone().unwrap();
        assert_eq!(
            kind("sub"),
            Kind::StringValue("spiffe://example.org/a".into())
        );
        assert_eq!(kind("exp"), Kind::NumberValue(1_700_000_000.0));
        assert_eq!(kind("ok"), Kind::BoolValue(true));
        assert_eq!(kind("none"), Kind::NullValue(0));
        let Kind::ListValue(list) = kind("aud") else {
            panic!("aud is not a list")
        };
        assert_eq!(list.values.len(), 2);
        let Kind::StructValue(nested) = kind("nested") else {
            panic!("nested is not a struct")
        };
        assert_eq!(nested.fields["k"].kind, Some(Kind::NumberValue(1.5)));
    }

    #[test]
    fn trust_domain_keys_are_spiffe_ids() {
        assert_eq!(trust_domain_key("example.org"), "spiffe://example.org");
        assert_eq!(
            trust_domain_key("spiffe://example.org"),
            "spiffe://example.org"
        );
        assert_eq!(
            trust_domain_of("spiffe://example.org/ns/a"),
            "spiffe://example.org"
        );
    }

    #[test]
    fn security_header_must_be_exactly_true() {
        let mut h = http::HeaderMap::new();
        assert!(!has_security_header(&h));
        h.insert(SECURITY_HEADER, http::HeaderValue::from_static("false"));
        assert!(!has_security_header(&h));
        h.insert(SECURITY_HEADER, http::HeaderValue::from_static("true"));
        assert!(has_security_header(&h));
    }

    #[test]
    fn provider_errors_map_to_status_codes() {
        use tonic::Code;
        let cases = [
            (
                IdentityError::PermissionDenied("p".into()),
                Code::PermissionDenied,
            ),
            (IdentityError::Unavailable("u".into()), Code::Unavailable),
            (
                IdentityError::InvalidArgument("i".into()),
                Code::InvalidArgument,
            ),
            (
                IdentityError::Internal("secret detail".into()),
                Code::Internal,
            ),
        ];
        for (e, code) in cases {
            let s = to_status(e);
            assert_eq!(s.code(), code);
            assert!(!s.message().contains("secret detail"));
        }
    }
}
