//! The HTTP/1.1 fast path of a reverse-proxy connection to a plain-HTTP
//! upstream (an `https` upstream stays with hyper and its ALPN h2 pool).
//!
//! hyper costs two full HTTP stacks per request here (server and pooled
//! client, with a task hop between them). For the common request — HTTP/1.1,
//! origin-form target, no body or a `Content-Length` body, no upgrade, no
//! `Expect` — this module relays bytes itself, in the client connection's
//! task, over an upstream connection it holds for the request — taken from
//! the route's idle set ([`IdleUpstreams`]) and returned there after a
//! complete response, so that a keep-alive client between requests holds
//! only its own socket:
//!
//! 1. read the head (at most [`MAX_HEAD_BYTES`]) and check it with the same
//!    rules as the framing gate ([`gate::check_request`]);
//! 2. admit it exactly as the hyper path does ([`proxy::admit`]: attested,
//!    not frozen, allowed, credential, `session.start` record first);
//! 3. write the rewritten head — target under the base path, the injected
//!    query parameter, `Host` of the upstream, hop-by-hop headers (and those
//!    `Connection` names), the client's `Host` and any client copy of the
//!    injected header dropped, the credential added — then the body;
//! 4. read the response head (within `request_timeout`), drop its hop-by-hop
//!    headers and any header carrying the secret, and relay the body by its
//!    framing: none (HEAD, 1xx, 204, 304), `Content-Length`, chunked (walked
//!    and checked chunk by chunk) or until the upstream closes.
//!
//! Any request it does not take — a chunked body, an upgrade, CONNECT,
//! `Expect`, HTTP/1.0, an absolute-form target, a head the gate refuses, a
//! request warden refuses — hands the connection, with every byte already
//! read, to the hyper path for the rest of its life, so those keep one
//! implementation with its errors and tests. The handover happens before
//! anything of that request was sent anywhere.
//!
//! Errors it answers itself (the upstream is unreachable, times out, or
//! sends a malformed response) use the hyper path's messages and metrics and
//! close the client connection.

use super::gate::{self, BodyFraming, MAX_HEADERS, MAX_HEAD_BYTES};
use super::headers::{echoes_secret, has_token, is_hop_by_hop_in};
use super::proxy::{self, Body, ConnCtx};
use super::upstream::{self, ConnectError, Stream};
use bytes::Bytes;
use http::StatusCode;
use http_body_util::{BodyExt, Either};
use std::io;
use std::mem::MaybeUninit;
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use zeroize::Zeroizing;

/// Read size for both sides.
const CHUNK: usize = 16 * 1024;
/// Largest upstream response head accepted.
const MAX_RESPONSE_HEAD: usize = 64 * 1024;
/// An idle client connection is closed after this long without a request.
const IDLE_TIMEOUT: Duration = Duration::from_secs(75);
/// A request head must be complete this long after its first byte.
pub(super) const HEAD_TIMEOUT: Duration = Duration::from_secs(30);

/// How [`serve`] ended.
pub enum Outcome {
    /// The connection is finished.
    Done,
    /// Serve the rest of the connection with hyper; these bytes were read
    /// from the client and come first.
    Handover(Vec<u8>),
}

/// Idle upstream connections a route's fast path keeps between requests,
/// newest last. A client connection holds one only while a request is in
/// flight; [`IDLE_UPSTREAMS`] at most are kept, each for
/// [`UPSTREAM_IDLE`] at most (a closed one is noticed before reuse, and a
/// bodiless request that meets one closed under it is sent again).
#[derive(Default)]
pub struct IdleUpstreams(std::sync::Mutex<Vec<(Upstream, Instant)>>);

/// Most idle upstream connections kept per route.
const IDLE_UPSTREAMS: usize = 64;
/// An idle upstream connection is closed after this long unused.
const UPSTREAM_IDLE: Duration = Duration::from_secs(30);

impl IdleUpstreams {
    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<(Upstream, Instant)>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The most recently used idle connection, if any.
    fn take(&self) -> Option<Upstream> {
        self.lock().pop().map(|(u, _)| u)
    }

    /// Keeps `u` for the next request (the oldest goes when full).
    fn put(&self, u: Upstream) {
        let dropped = {
            let mut idle = self.lock();
            let dropped = (idle.len() >= IDLE_UPSTREAMS).then(|| idle.remove(0));
            idle.push((u, Instant::now()));
            dropped
        };
        drop(dropped);
    }

    /// Closes the connections idle longer than [`UPSTREAM_IDLE`].
    pub fn reap(&self) {
        let expired: Vec<(Upstream, Instant)> = {
            let mut idle = self.lock();
            let n = idle
                .iter()
                .take_while(|(_, at)| at.elapsed() >= UPSTREAM_IDLE)
                .count();
            idle.drain(..n).collect()
        };
        drop(expired);
    }
}

/// An upstream connection of the fast path.
struct Upstream {
    stream: Stream,
    /// Bytes read from the upstream and not relayed yet.
    buf: Vec<u8>,
    /// The connection served an earlier request (a failure before any
    /// response byte may then be a keep-alive race).
    reused: bool,
    /// The client's response head (and first body bytes), reused.
    out: Vec<u8>,
}

/// Response body framing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Framing {
    Fixed(u64),
    Chunked,
    UntilClose,
}

/// Why a relay could not go on.
enum Fail {
    /// The client went away.
    Client,
    /// The upstream failed before the response head: answer with this
    /// status, metric result and message, then close.
    Answer(StatusCode, &'static str, String),
    /// The upstream failed mid-response: only closing is left.
    Broken(String),
    /// The reused upstream connection was closed under us before any
    /// response byte: a bodiless request may be sent again.
    Stale,
}

/// Serves requests on `client` until the connection ends or a request
/// needs the hyper path.
pub(super) async fn serve(client: &mut TcpStream, ctx: &ConnCtx) -> Outcome {
    if !ctx.route.fast_path {
        // TLS upstreams stay with hyper: ALPN may pick HTTP/2, whose pooled
        // multiplexed connections beat one HTTP/1.1 connection per client.
        // `fast_path = false` keeps a plain one there too.
        return Outcome::Handover(Vec::new());
    }
    let mut buf: Vec<u8> = Vec::with_capacity(CHUNK);
    // The upstream connection of the request in flight.
    let mut up: Option<Upstream> = None;
    let mut client_timer = Deadline::new();
    let mut upstream_timer = Deadline::new();
    loop {
        let head_len = match read_head(client, &mut buf, &mut client_timer).await {
            HeadRead::Complete(n) => n,
            HeadRead::Closed => return Outcome::Done,
            HeadRead::Handover => return Outcome::Handover(buf),
        };
        let started = Instant::now();
        // The head is parsed once; the parse borrows `buf` until the
        // upstream head is built.
        let step = {
            let mut headers = [const { MaybeUninit::uninit() }; MAX_HEADERS];
            let taken = parse_request(&buf[..head_len], &mut headers)
                .and_then(|req| plan_request(&req).map(|plan| (req, plan)));
            match taken {
                None => Step::Handover,
                Some((req, plan)) => match proxy::admit(ctx).await {
                    Err(answer) => Step::Answer(Box::new(answer)),
                    Ok(prepared) => match upstream_head(ctx, &req, &prepared) {
                        Err(answer) => Step::Answer(answer),
                        Ok(head) => Step::Forward(plan, prepared, head),
                    },
                },
            }
        };
        let (plan, prepared, head) = match step {
            Step::Handover => return Outcome::Handover(buf),
            Step::Answer(answer) => {
                let _ = send_own(client, *answer).await;
                return Outcome::Done;
            }
            Step::Forward(plan, prepared, head) => (plan, prepared, head),
        };
        buf.drain(..head_len);
        let mut attempt = 0;
        let result = loop {
            attempt += 1;
            if attempt == 1 {
                // A retry after a stale connection opens a fresh one.
                up = ctx.route.idle.take();
            }
            let before_upstream = Instant::now();
            let request = Outgoing {
                plan: &plan,
                head: &head,
                secret: &prepared.secret,
            };
            let res = exchange(
                client,
                &mut buf,
                &mut up,
                ctx,
                &request,
                &mut upstream_timer,
            )
            .await;
            match res {
                Err(Fail::Stale) if attempt == 1 && plan.body == 0 => {
                    up = None;
                    continue;
                }
                other => break other.map(|after| (before_upstream, after)),
            }
        };
        let route = &ctx.route;
        let metrics = &ctx.shared.metrics;
        match result {
            Ok((before_upstream, (response_head_at, keep))) => {
                let added = (before_upstream - started) + response_head_at.elapsed();
                proxy::count_forwarded(route, metrics, added);
                // Between requests the client holds only its own socket.
                if let Some(u) = up.take().filter(|_| keep.upstream) {
                    route.idle.put(u);
                }
                if !keep.client || plan.client_close {
                    let _ = client.shutdown().await;
                    return Outcome::Done;
                }
            }
            Err(Fail::Client) => return Outcome::Done,
            Err(Fail::Answer(status, result, why)) => {
                metrics.http_request(&route.name, result);
                let msg = format!("warden: route {:?}: {why}", route.name);
                tracing::warn!(route = %route.name, "{msg}");
                let _ = send_own(client, proxy::text(status, &msg)).await;
                return Outcome::Done;
            }
            Err(fail @ (Fail::Broken(_) | Fail::Stale)) => {
                let why = match fail {
                    Fail::Broken(why) => why,
                    _ => "the upstream closed the kept-alive connection".to_string(),
                };
                metrics.http_request(&route.name, "upstream_error");
                tracing::warn!(route = %route.name, "upstream {} failed mid-response: {why}", route.authority);
                return Outcome::Done;
            }
        }
    }
}

/// What to do with a complete request head.
enum Step {
    /// Hand the connection to the hyper path.
    Handover,
    /// warden's own answer, then close.
    Answer(Box<http::Response<Body>>),
    /// Forward it: the plan, the credential, the upstream head.
    Forward(Plan, std::sync::Arc<proxy::Prepared>, Zeroizing<Vec<u8>>),
}

enum HeadRead {
    Complete(usize),
    Closed,
    Handover,
}

/// One timer kept for a connection's waits and moved for each: moving a
/// tokio timer to a later deadline is an atomic store, whereas a fresh
/// `timeout` per read inserts into and removes from the timer wheel for
/// every request.
struct Deadline(std::pin::Pin<Box<tokio::time::Sleep>>);

impl Deadline {
    fn new() -> Deadline {
        Deadline(Box::pin(tokio::time::sleep(IDLE_TIMEOUT)))
    }

    /// `fut`'s output, or `None` when `at` passed first.
    async fn run<F: std::future::Future>(
        &mut self,
        at: tokio::time::Instant,
        fut: F,
    ) -> Option<F::Output> {
        self.0.as_mut().reset(at);
        tokio::select! {
            biased;
            v = fut => Some(v),
            () = self.0.as_mut() => None,
        }
    }
}

/// Reads until `buf` holds a complete head (leading blank lines dropped).
async fn read_head(client: &mut TcpStream, buf: &mut Vec<u8>, timer: &mut Deadline) -> HeadRead {
    let mut deadline: Option<tokio::time::Instant> = None;
    loop {
        let skip = buf
            .iter()
            .take_while(|b| matches!(b, b'\r' | b'\n'))
            .count();
        buf.drain(..skip);
        if !buf.is_empty() {
            match gate::find(buf, b"\r\n\r\n") {
                // The gate answers 431 for a head over the limit.
                Some(i) if i + 4 > MAX_HEAD_BYTES => return HeadRead::Handover,
                Some(i) => return HeadRead::Complete(i + 4),
                None => {}
            }
            if buf.len() > MAX_HEAD_BYTES {
                // The gate answers 431.
                return HeadRead::Handover;
            }
        }
        let at = match deadline {
            None if buf.is_empty() => tokio::time::Instant::now() + IDLE_TIMEOUT,
            None => {
                let d = tokio::time::Instant::now() + HEAD_TIMEOUT;
                deadline = Some(d);
                d
            }
            Some(d) => d,
        };
        match timer.run(at, read_more(client, buf)).await {
            Some(Ok(0)) | Some(Err(_)) | None => return HeadRead::Closed,
            Some(Ok(_)) => {}
        }
    }
}

/// Appends one read's worth to `buf`.
async fn read_more<R: AsyncRead + Unpin>(r: &mut R, buf: &mut Vec<u8>) -> io::Result<usize> {
    if buf.capacity() - buf.len() < CHUNK / 4 {
        buf.reserve(CHUNK);
    }
    r.read_buf(buf).await
}

/// What the fast path needs to know about a request it takes.
struct Plan {
    /// Body bytes (Content-Length).
    body: u64,
    head_request: bool,
    /// The client asked to close after this response.
    client_close: bool,
}

/// Whether the fast path takes this head, and how; `None` hands it over.
fn plan_request(req: &httparse::Request<'_, '_>) -> Option<Plan> {
    let check = gate::check_request(req).ok()?;
    let BodyFraming::Fixed(body) = check.body else {
        return None;
    };
    if check.switches || req.version != Some(1) || !req.path?.starts_with('/') {
        return None;
    }
    let mut client_close = false;
    for h in req.headers.iter() {
        if h.name.eq_ignore_ascii_case("expect") {
            return None;
        }
        if h.name.eq_ignore_ascii_case("connection") && has_token(h.value, "close") {
            client_close = true;
        }
    }
    Some(Plan {
        body,
        head_request: req.method == Some("HEAD"),
        client_close,
    })
}

/// Parses a complete request head with the gate's parser settings, into
/// header slots that need no zeroing first (100 slots, 3 KiB, per parse).
fn parse_request<'h, 'b>(
    head: &'b [u8],
    headers: &'h mut [MaybeUninit<httparse::Header<'b>>],
) -> Option<httparse::Request<'h, 'b>> {
    let mut req = httparse::Request::new(&mut []);
    match req.parse_with_uninit_headers(head, headers) {
        Ok(httparse::Status::Complete(_)) => Some(req),
        _ => None,
    }
}

/// Whether a comma-separated header value lists `token` (any case).
/// Whether header `name` is hop-by-hop in a parsed head (see
/// [`super::headers::is_hop_by_hop`]).
fn is_hop_by_hop(name: &str, headers: &[httparse::Header<'_>]) -> bool {
    let connection = headers
        .iter()
        .filter(|h| h.name.eq_ignore_ascii_case("connection"))
        .map(|h| h.value);
    is_hop_by_hop_in(name, connection)
}

/// The request head warden sends upstream (it holds the credential:
/// zeroized on drop).
fn upstream_head(
    ctx: &ConnCtx,
    req: &httparse::Request<'_, '_>,
    prepared: &proxy::Prepared,
) -> Result<Zeroizing<Vec<u8>>, Box<http::Response<Body>>> {
    let route = &ctx.route;
    let metrics = &ctx.shared.metrics;
    let bad = |m: &str| {
        metrics.http_request(&route.name, "bad_request");
        Box::new(proxy::text(StatusCode::BAD_REQUEST, m))
    };
    let (method, target) = (req.method.unwrap_or("GET"), req.path.unwrap_or("/"));
    let (path, query) = match target.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (target, None),
    };
    if path.contains('#') || target.bytes().any(|b| b <= b' ' || b == 0x7f) {
        return Err(bad("warden: the request target is not a valid URI"));
    }
    let query = route.injection.rewrite_query(query, &prepared.secret);
    let injected = route.injection.header_name();
    let value = match (injected, &prepared.header) {
        (Some(_), Some(Err(m))) => {
            metrics.http_request(&route.name, "credential_error");
            let msg = format!("warden: route {:?}: {m}", route.name);
            tracing::warn!(route = %route.name, "{msg}");
            return Err(Box::new(proxy::text(StatusCode::BAD_GATEWAY, &msg)));
        }
        (Some(name), Some(Ok(v))) => Some((name, v)),
        _ => None,
    };
    let mut out = Zeroizing::new(Vec::with_capacity(512));
    out.extend_from_slice(method.as_bytes());
    out.push(b' ');
    out.extend_from_slice(route.base_path.as_bytes());
    out.extend_from_slice(path.as_bytes());
    if let Some(q) = &query {
        out.push(b'?');
        out.extend_from_slice(q.as_bytes());
    }
    out.extend_from_slice(b" HTTP/1.1\r\nhost: ");
    out.extend_from_slice(route.authority.as_str().as_bytes());
    out.extend_from_slice(b"\r\n");
    for h in req.headers.iter() {
        if is_hop_by_hop(h.name, req.headers)
            || h.name.eq_ignore_ascii_case("host")
            || injected.is_some_and(|n| h.name.eq_ignore_ascii_case(n.as_str()))
        {
            continue;
        }
        push_header(&mut out, h.name.as_bytes(), h.value);
    }
    if let Some((name, v)) = value {
        push_header(&mut out, name.as_str().as_bytes(), v.as_bytes());
    }
    out.extend_from_slice(b"\r\n");
    Ok(out)
}

fn push_header(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.extend_from_slice(name);
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

/// One request as it goes upstream.
struct Outgoing<'a> {
    plan: &'a Plan,
    /// The rewritten head (it carries the credential).
    head: &'a [u8],
    /// The injected secret, to keep it out of the response headers.
    secret: &'a [u8],
}

/// What may stay open after a response.
struct Keep {
    client: bool,
    upstream: bool,
}

/// One request/response over the connection's upstream: sends `head` and
/// the body, relays the response. Ok: when the response head arrived.
async fn exchange(
    client: &mut TcpStream,
    cbuf: &mut Vec<u8>,
    slot: &mut Option<Upstream>,
    ctx: &ConnCtx,
    request: &Outgoing<'_>,
    timer: &mut Deadline,
) -> Result<(Instant, Keep), Fail> {
    let (plan, head, secret) = (request.plan, request.head, request.secret);
    let route = &ctx.route;
    if let Some(u) = slot.as_mut() {
        if !still_open(&u.stream) {
            *slot = None;
        }
    }
    if slot.is_none() {
        *slot = Some(connect(ctx).await?);
    }
    let Some(up) = slot.as_mut() else {
        return Err(Fail::Broken("no upstream connection".into()));
    };

    // Request: head and as much of the body as is here, in one write.
    let here = cbuf
        .len()
        .min(usize::try_from(plan.body).unwrap_or(usize::MAX));
    let sent = if here == 0 {
        up.stream.write_all(head).await
    } else {
        let mut first = Zeroizing::new(Vec::with_capacity(head.len() + here));
        first.extend_from_slice(head);
        first.extend_from_slice(&cbuf[..here]);
        cbuf.drain(..here);
        up.stream.write_all(&first).await
    };
    if sent.is_err() {
        return Err(if up.reused && here == 0 && plan.body == 0 {
            Fail::Stale
        } else {
            Fail::Broken("the upstream connection failed while sending".into())
        });
    }
    let mut left = plan.body - here as u64;
    while left > 0 {
        cbuf.clear();
        let n = read_more(client, cbuf).await.map_err(|_| Fail::Client)?;
        if n == 0 {
            return Err(Fail::Client);
        }
        let take = cbuf.len().min(usize::try_from(left).unwrap_or(usize::MAX));
        up.stream
            .write_all(&cbuf[..take])
            .await
            .map_err(|e| Fail::Broken(format!("sending the body: {e}")))?;
        cbuf.drain(..take);
        left -= take as u64;
    }

    // Response head.
    let timeout = route.request_timeout;
    let read_head = async {
        loop {
            if let Some(i) = gate::find(&up.buf, b"\r\n\r\n") {
                return Ok(i + 4);
            }
            if up.buf.len() > MAX_RESPONSE_HEAD {
                return Err(Fail::Answer(
                    StatusCode::BAD_GATEWAY,
                    "upstream_error",
                    format!(
                        "upstream {} sent a response head over {MAX_RESPONSE_HEAD} bytes",
                        route.authority
                    ),
                ));
            }
            match read_more(&mut up.stream, &mut up.buf).await {
                Ok(0) | Err(_) if up.buf.is_empty() && up.reused => return Err(Fail::Stale),
                Ok(0) => {
                    return Err(Fail::Answer(
                        StatusCode::BAD_GATEWAY,
                        "upstream_error",
                        format!(
                            "upstream {} closed the connection without a response",
                            route.authority
                        ),
                    ))
                }
                Err(e) => {
                    return Err(Fail::Answer(
                        StatusCode::BAD_GATEWAY,
                        "upstream_error",
                        format!("upstream {} failed: {e}", route.authority),
                    ))
                }
                Ok(_) => {}
            }
        }
    };
    let at = tokio::time::Instant::now() + timeout;
    let mut head_len = match timer.run(at, read_head).await {
        None => {
            return Err(Fail::Answer(
                StatusCode::GATEWAY_TIMEOUT,
                "upstream_timeout",
                format!(
                    "upstream {} did not answer within {} ms (request_timeout)",
                    route.authority,
                    timeout.as_millis()
                ),
            ))
        }
        Some(r) => r?,
    };
    let response_head_at = Instant::now();
    up.reused = true;
    // Interim responses (1xx other than 101) are dropped; the final one follows.
    let (framing, upstream_keep) = loop {
        let head = &up.buf[..head_len];
        match response_head(head, plan.head_request, secret, &route.name, &mut up.out) {
            Err(why) => {
                return Err(Fail::Answer(
                    StatusCode::BAD_GATEWAY,
                    "upstream_error",
                    format!(
                        "upstream {} sent an invalid response: {why}",
                        route.authority
                    ),
                ))
            }
            Ok(None) => {
                up.buf.drain(..head_len);
                head_len = loop {
                    if let Some(i) = gate::find(&up.buf, b"\r\n\r\n") {
                        break i + 4;
                    }
                    match read_more(&mut up.stream, &mut up.buf).await {
                        Ok(n) if n > 0 && up.buf.len() <= MAX_RESPONSE_HEAD => {}
                        _ => {
                            return Err(Fail::Broken(
                                "the upstream ended after an interim response".into(),
                            ))
                        }
                    }
                };
            }
            Ok(Some(r)) => break r,
        }
    };
    up.buf.drain(..head_len);
    let client_keep = framing != Framing::UntilClose;
    if plan.client_close && client_keep {
        // The client asked to close after this response: say so.
        let end = up.out.len() - 2;
        up.out
            .splice(end..end, b"connection: close\r\n".iter().copied());
    }

    // Head and the body bytes already here, in one write; then the rest.
    let mut walker = BodyWalker::new(framing);
    let now = walker.take(&up.buf).map_err(Fail::Broken)?;
    up.out.extend_from_slice(&up.buf[..now]);
    up.buf.drain(..now);
    client.write_all(&up.out).await.map_err(|_| Fail::Client)?;
    up.out.clear();
    while !walker.done() {
        let n = read_more(&mut up.stream, &mut up.buf)
            .await
            .map_err(|e| Fail::Broken(e.to_string()))?;
        if n == 0 {
            if framing == Framing::UntilClose {
                break;
            }
            return Err(Fail::Broken("the upstream closed mid-body".into()));
        }
        let take = walker.take(&up.buf).map_err(Fail::Broken)?;
        client
            .write_all(&up.buf[..take])
            .await
            .map_err(|_| Fail::Client)?;
        up.buf.drain(..take);
    }
    // Bytes after a complete response were never asked for.
    let upstream_keep = upstream_keep && up.buf.is_empty() && framing != Framing::UntilClose;
    Ok((
        response_head_at,
        Keep {
            client: client_keep,
            upstream: upstream_keep,
        },
    ))
}

/// A plain upstream socket that is readable while idle was closed (or sent
/// something unasked): do not reuse it. TLS connections are not probed; a
/// stale one shows as [`Fail::Stale`].
fn still_open(stream: &Stream) -> bool {
    match stream {
        Stream::Plain(tcp) => {
            let mut probe = [0u8; 1];
            matches!(tcp.try_read(&mut probe), Err(e) if e.kind() == io::ErrorKind::WouldBlock)
        }
        Stream::Tls(_) => true,
    }
}

async fn connect(ctx: &ConnCtx) -> Result<Upstream, Fail> {
    let route = &ctx.route;
    let https = route.scheme == http::uri::Scheme::HTTPS;
    let host = route.authority.host();
    let port = route
        .authority
        .port_u16()
        .unwrap_or(if https { 443 } else { 80 });
    let c = &route.h1;
    match upstream::open(host, port, c.tls.as_ref(), c.connect_timeout, &c.ca_label).await {
        Ok((stream, _)) => Ok(Upstream {
            stream,
            buf: Vec::with_capacity(CHUNK),
            reused: false,
            out: Vec::with_capacity(1024),
        }),
        Err(ConnectError::Timeout(m)) => Err(Fail::Answer(
            StatusCode::GATEWAY_TIMEOUT,
            "upstream_timeout",
            m,
        )),
        Err(ConnectError::Certificate(m)) => Err(Fail::Answer(
            StatusCode::BAD_GATEWAY,
            "upstream_tls_error",
            m,
        )),
        Err(ConnectError::Failed(m)) => {
            Err(Fail::Answer(StatusCode::BAD_GATEWAY, "upstream_error", m))
        }
    }
}

/// Writes the client's response head for an upstream head into `out` and
/// returns its body framing and whether the upstream connection may be
/// reused; `None` for an interim (1xx) response to skip.
fn response_head(
    head: &[u8],
    head_request: bool,
    secret: &[u8],
    route: &str,
    out: &mut Vec<u8>,
) -> Result<Option<(Framing, bool)>, String> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut resp = httparse::Response::new(&mut headers);
    match resp.parse(head) {
        Ok(httparse::Status::Complete(_)) => {}
        Ok(httparse::Status::Partial) => return Err("incomplete head".into()),
        Err(e) => return Err(e.to_string()),
    }
    let code = resp.code.unwrap_or(0);
    if code == 101 {
        return Err("101 Switching Protocols without an upgrade request".into());
    }
    if (100..200).contains(&code) {
        return Ok(None);
    }
    let http10 = resp.version == Some(0);
    let mut length: Option<u64> = None;
    let mut chunked = false;
    let mut te = false;
    let mut keep = !http10;
    for h in resp.headers.iter() {
        if h.name.eq_ignore_ascii_case("content-length") {
            let v = std::str::from_utf8(h.value).unwrap_or("").trim();
            length = Some(gate::parse_content_length(v, length).map_err(|r| r.reason)?);
        } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
            te = true;
            chunked = h
                .value
                .split(|b| *b == b',')
                .map(<[u8]>::trim_ascii)
                .rfind(|t| !t.is_empty())
                .is_some_and(|t| t.eq_ignore_ascii_case(b"chunked"));
        } else if h.name.eq_ignore_ascii_case("connection") {
            if has_token(h.value, "close") {
                keep = false;
            } else if http10 && has_token(h.value, "keep-alive") {
                keep = true;
            }
        }
    }
    if te && length.is_some() {
        return Err("both Content-Length and Transfer-Encoding".into());
    }
    let no_body = head_request || code == 204 || code == 304;
    let framing = if no_body {
        Framing::Fixed(0)
    } else if te {
        if chunked {
            Framing::Chunked
        } else {
            Framing::UntilClose
        }
    } else {
        match length {
            Some(n) => Framing::Fixed(n),
            None => Framing::UntilClose,
        }
    };
    out.clear();
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(&[
        b'0' + (code / 100 % 10) as u8,
        b'0' + (code / 10 % 10) as u8,
        b'0' + (code % 10) as u8,
        b' ',
    ]);
    out.extend_from_slice(resp.reason.unwrap_or("").as_bytes());
    out.extend_from_slice(b"\r\n");
    for h in resp.headers.iter() {
        if is_hop_by_hop(h.name, resp.headers) {
            continue;
        }
        if echoes_secret(h.value, secret, route, h.name) {
            continue;
        }
        push_header(out, h.name.as_bytes(), h.value);
    }
    if framing == Framing::Chunked {
        out.extend_from_slice(b"transfer-encoding: chunked\r\n");
    }
    if framing == Framing::UntilClose {
        out.extend_from_slice(b"connection: close\r\n");
    }
    out.extend_from_slice(b"\r\n");
    Ok(Some((framing, keep)))
}

/// Walks a response body by its framing: how many of the bytes at hand
/// belong to it, and when it is complete. Chunk framing is checked as it
/// passes (the same size-line rules as the request gate).
struct BodyWalker {
    state: Walk,
    line: Vec<u8>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Walk {
    Fixed(u64),
    ChunkLine,
    ChunkData(u64),
    ChunkEnd(u8),
    Trailers(usize),
    UntilClose,
    Done,
}

impl BodyWalker {
    fn new(framing: Framing) -> BodyWalker {
        let state = match framing {
            Framing::Fixed(0) => Walk::Done,
            Framing::Fixed(n) => Walk::Fixed(n),
            Framing::Chunked => Walk::ChunkLine,
            Framing::UntilClose => Walk::UntilClose,
        };
        BodyWalker {
            state,
            line: Vec::new(),
        }
    }

    fn done(&self) -> bool {
        self.state == Walk::Done
    }

    /// How many bytes of `data` belong to the body (a prefix).
    fn take(&mut self, data: &[u8]) -> Result<usize, String> {
        let mut i = 0;
        while i < data.len() {
            match self.state {
                Walk::Done => break,
                Walk::UntilClose => return Ok(data.len()),
                Walk::Fixed(left) => {
                    let n = left.min((data.len() - i) as u64);
                    i += n as usize;
                    self.state = if n == left {
                        Walk::Done
                    } else {
                        Walk::Fixed(left - n)
                    };
                }
                Walk::ChunkData(left) => {
                    let n = left.min((data.len() - i) as u64);
                    i += n as usize;
                    self.state = if n == left {
                        Walk::ChunkEnd(0)
                    } else {
                        Walk::ChunkData(left - n)
                    };
                }
                Walk::ChunkEnd(seen) => {
                    let want = if seen == 0 { b'\r' } else { b'\n' };
                    if data[i] != want {
                        return Err("chunk data is not followed by CRLF".into());
                    }
                    i += 1;
                    self.state = if seen == 0 {
                        Walk::ChunkEnd(1)
                    } else {
                        Walk::ChunkLine
                    };
                }
                Walk::ChunkLine | Walk::Trailers(_) => {
                    let nl = data[i..].iter().position(|b| *b == b'\n');
                    let end = nl.map_or(data.len(), |p| i + p + 1);
                    self.line.extend_from_slice(&data[i..end]);
                    i = end;
                    if self.line.len() > 4096 {
                        return Err("a chunk-size or trailer line is too long".into());
                    }
                    if nl.is_none() {
                        continue;
                    }
                    let line = std::mem::take(&mut self.line);
                    self.state = match self.state {
                        Walk::ChunkLine => match gate::parse_chunk_line(&line) {
                            Ok(0) => Walk::Trailers(0),
                            Ok(n) => Walk::ChunkData(n),
                            Err(r) => return Err(r.reason),
                        },
                        Walk::Trailers(total) => {
                            let total = total + line.len();
                            if line == b"\r\n" {
                                Walk::Done
                            } else if !line.ends_with(b"\r\n") || total > 16 * 1024 {
                                return Err("invalid trailer section".into());
                            } else {
                                Walk::Trailers(total)
                            }
                        }
                        other => other,
                    };
                }
            }
        }
        Ok(i)
    }
}

/// Writes one of warden's own answers (a [`proxy::text`] response) and
/// closes: `connection: close` and a length.
async fn send_own<W: AsyncWrite + Unpin>(
    client: &mut W,
    resp: http::Response<Body>,
) -> io::Result<()> {
    let (parts, body) = resp.into_parts();
    let body: Bytes = match body {
        Either::Right(full) => full
            .collect()
            .await
            .map(|c| c.to_bytes())
            .unwrap_or_default(),
        Either::Left(_) => Bytes::new(),
    };
    let mut out = Vec::with_capacity(256 + body.len());
    out.extend_from_slice(
        format!(
            "HTTP/1.1 {} {}\r\n",
            parts.status.as_u16(),
            parts.status.canonical_reason().unwrap_or("")
        )
        .as_bytes(),
    );
    for (name, value) in &parts.headers {
        push_header(&mut out, name.as_str().as_bytes(), value.as_bytes());
    }
    out.extend_from_slice(
        format!(
            "content-length: {}\r\nconnection: close\r\n\r\n",
            body.len()
        )
        .as_bytes(),
    );
    out.extend_from_slice(&body);
    client.write_all(&out).await?;
    client.shutdown().await
}

/// A client connection handed to hyper: the bytes the fast path already
/// read come first, then the socket.
pub use warden_core::rewind::Rewind;

/// The private response-body walker, for the fuzz targets in `fuzz/`
/// only: not part of the crate's interface.
#[doc(hidden)]
pub mod fuzzing {
    use super::{BodyWalker, Framing};

    /// Walks a chunked response body given in `chunks`, in turn: the bytes
    /// taken from each chunk and whether the body is complete, or the
    /// walker's reason for refusing it.
    pub fn walk_chunked(chunks: &[&[u8]]) -> Result<(Vec<usize>, bool), String> {
        let mut walker = BodyWalker::new(Framing::Chunked);
        let mut taken = Vec::with_capacity(chunks.len());
        for chunk in chunks {
            taken.push(walker.take(chunk)?);
        }
        Ok((taken, walker.done()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_the_fast_path_takes_and_hands_over() {
        let plan_of = |h: &[u8]| {
            let mut headers = [const { MaybeUninit::uninit() }; MAX_HEADERS];
            parse_request(h, &mut headers).and_then(|req| plan_request(&req))
        };
        let take = |h: &str| plan_of(h.as_bytes()).is_some();
        assert!(take("GET /a?b=1 HTTP/1.1\r\nhost: x\r\n\r\n"));
        assert!(take("POST /a HTTP/1.1\r\ncontent-length: 3\r\n\r\n"));
        for handed in [
            "POST /a HTTP/1.1\r\ntransfer-encoding: chunked\r\n\r\n",
            "GET /a HTTP/1.0\r\n\r\n",
            "GET http://x/a HTTP/1.1\r\n\r\n",
            "CONNECT x:443 HTTP/1.1\r\n\r\n",
            "GET /ws HTTP/1.1\r\nupgrade: websocket\r\nconnection: upgrade\r\n\r\n",
            "PUT /a HTTP/1.1\r\nexpect: 100-continue\r\ncontent-length: 1\r\n\r\n",
            "POST /a HTTP/1.1\r\ncontent-length: 1\r\ncontent-length: 2\r\n\r\n",
            "POST /a HTTP/1.1\r\ncontent-length: 1\r\ntransfer-encoding: chunked\r\n\r\n",
            "GET /a HTTP/1.1\r\nhost: a\r\nhost: b\r\n\r\n",
        ] {
            assert!(!take(handed), "{handed:?}");
        }
        let p = plan_of(b"HEAD / HTTP/1.1\r\nConnection: keep-alive, Close\r\n\r\n").unwrap();
        assert!(p.head_request && p.client_close && p.body == 0);
    }

    #[test]
    fn response_heads_lose_hop_by_hop_headers_and_secret_echoes() {
        let mut out = Vec::new();
        let mut head_of = |head: &[u8], is_head: bool, secret: &[u8]| {
            response_head(head, is_head, secret, "r", &mut out)
                .map(|r| r.map(|(f, keep)| (f, keep, String::from_utf8(out.clone()).unwrap())))
        };
        let head = b"HTTP/1.1 200 OK\r\nConnection: x-private\r\nx-private: 1\r\nkeep-alive: timeout=5\r\nx-echo: Bearer tok-123456\r\ncontent-type: text/plain\r\ncontent-length: 2\r\n\r\n";
        let (framing, keep, text) = head_of(head, false, b"tok-123456").unwrap().unwrap();
        assert_eq!(framing, Framing::Fixed(2));
        assert!(keep);
        assert_eq!(
            text,
            "HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: 2\r\n\r\n"
        );
        // Chunked keeps its framing; a close-delimited body closes the client.
        let chunked = b"HTTP/1.1 201 Created\r\ntransfer-encoding: gzip, chunked\r\n\r\n";
        let (framing, _, text) = head_of(chunked, false, b"").unwrap().unwrap();
        assert_eq!(framing, Framing::Chunked);
        assert!(text.starts_with("HTTP/1.1 201 Created\r\n"), "{text}");
        assert!(text.contains("transfer-encoding: chunked\r\n"), "{text}");
        let (framing, keep, text) = head_of(b"HTTP/1.0 200 OK\r\n\r\n", false, b"")
            .unwrap()
            .unwrap();
        assert_eq!(framing, Framing::UntilClose);
        assert!(!keep);
        assert!(text.contains("connection: close\r\n"), "{text}");
        // No body for HEAD, 204, 304 whatever the headers say.
        for (head, is_head) in [
            (&b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\n"[..], true),
            (b"HTTP/1.1 204 No Content\r\n\r\n", false),
            (
                b"HTTP/1.1 304 Not Modified\r\ncontent-length: 9\r\n\r\n",
                false,
            ),
        ] {
            let (framing, _, _) = head_of(head, is_head, b"").unwrap().unwrap();
            assert_eq!(framing, Framing::Fixed(0));
        }
        // Interim responses are skipped; smuggling-shaped ones refused.
        let early = b"HTTP/1.1 103 Early Hints\r\nlink: x\r\n\r\n";
        assert!(head_of(early, false, b"").unwrap().is_none());
        for bad in [
            &b"HTTP/1.1 101 Switching Protocols\r\n\r\n"[..],
            b"HTTP/1.1 200 OK\r\ncontent-length: 1\r\ntransfer-encoding: chunked\r\n\r\n",
            b"HTTP/1.1 200 OK\r\ncontent-length: 1\r\ncontent-length: 2\r\n\r\n",
            b"HTTP/1.1 200 OK\r\ncontent-length: -1\r\n\r\n",
            b"HTTP/1.1 abc\r\n\r\n",
        ] {
            let res = head_of(bad, false, b"");
            assert!(res.is_err(), "{:?}", String::from_utf8_lossy(bad));
        }
    }

    #[test]
    fn chunked_bodies_are_walked_to_their_end_in_any_split() {
        let body = b"4\r\nwiki\r\n5;ext=1\r\npedia\r\n0\r\nx-trailer: 1\r\n\r\n";
        let mut stream = body.to_vec();
        stream.extend_from_slice(b"HTTP/1.1 200 OK\r\n");
        for split in 1..body.len() {
            let mut w = BodyWalker::new(Framing::Chunked);
            let a = w.take(&stream[..split]).unwrap();
            assert_eq!(a, split, "split {split}");
            assert!(!w.done());
            let b = w.take(&stream[split..]).unwrap();
            assert_eq!(a + b, body.len(), "split {split}");
            assert!(w.done());
        }
        for bad in [
            &b"zz\r\n"[..],
            b"4\r\nwikiXY",
            b"4\r\nwiki\r\n0\r\nbad trailer\n",
        ] {
            let mut w = BodyWalker::new(Framing::Chunked);
            assert!(w.take(bad).is_err(), "{:?}", String::from_utf8_lossy(bad));
        }
        let mut w = BodyWalker::new(Framing::Fixed(3));
        assert_eq!(w.take(b"abcdef").unwrap(), 3);
        assert!(w.done());
    }
}
