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
//! `authority_fixup`), so those clients work too.

mod authority_fixup;

/// The `:authority` fix-up's byte-stream rewriter and HPACK decoder, for the
/// fuzz targets in `fuzz/` only: not part of the crate's interface.
#[doc(hidden)]
pub mod fuzzing {
    use super::authority_fixup::{huffman_decode, Decoder, Rewriter};

    /// One decoded header: name, value, and whether it was never-indexed.
    pub type Header = (Vec<u8>, Vec<u8>, bool);

    /// What the rewriter hands h2 for the client bytes `chunks`, read in
    /// turn, followed by the end of the stream.
    pub fn rewrite(chunks: &[&[u8]]) -> Vec<u8> {
        let mut rewriter = Rewriter::new();
        let mut out = Vec::new();
        for chunk in chunks {
            rewriter.feed(chunk, &mut out);
        }
        rewriter.finish(&mut out);
        out
    }

    /// Decodes header blocks in turn with one decoder (its dynamic table
    /// carries over); `None` for a block it refuses.
    pub fn hpack_decode(blocks: &[&[u8]]) -> Vec<Option<Vec<Header>>> {
        let mut decoder = Decoder::new();
        blocks
            .iter()
            .map(|block| {
                decoder.decode(block).ok().map(|headers| {
                    headers
                        .into_iter()
                        .map(|h| (h.name, h.value, h.never_indexed))
                        .collect()
                })
            })
            .collect()
    }

    /// RFC 7541 Huffman decoding; `None` for invalid input.
    pub fn huffman(input: &[u8]) -> Option<Vec<u8>> {
        huffman_decode(input).ok()
    }
}

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
    /// When warden accepted the connection (CLOCK_BOOTTIME ns), if known.
    pub accepted_ns: Option<u64>,
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
    conns: mpsc::Sender<std::io::Result<authority_fixup::Conn>>,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    let accepted_ns = warden_core::peer::boottime_ns();
                    if conns
                        .send(Ok(authority_fixup::Conn::new(stream, accepted_ns)))
                        .await
                        .is_err()
                    {
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
    let info = req.extensions().get::<authority_fixup::ConnInfo>();
    let cred = info
        .and_then(|info| info.uds.peer_cred)
        .or_else(|| {
            req.extensions()
                .get::<UdsConnectInfo>()
                .and_then(|info| info.peer_cred)
        })
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
        accepted_ns: info.map(|i| i.accepted_ns),
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
