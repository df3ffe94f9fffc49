//! Prometheus metrics (`warden_` prefix) and the small HTTP endpoint that serves
//! them with `/healthz` and `/readyz`.
//!
//! Labels stay low-cardinality: operation names and results, never a secret
//! name, a pid or a path.

use http_body_util::Full;
use hyper::body::Bytes;
use hyper::{Request, Response, StatusCode};
use prometheus::{
    Encoder, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry, TextEncoder,
};
use std::net::SocketAddr;
use std::sync::Arc;
use tokio::net::TcpListener;

#[derive(Clone)]
pub struct Metrics {
    inner: Arc<Inner>,
}

struct Inner {
    registry: Registry,
    sealed: IntGauge,
    admin_requests: IntCounterVec,
    audit_records: IntCounter,
    audit_failures: IntCounter,
    svids_issued: IntCounter,
    workload_api_denied: IntCounterVec,
}

impl Metrics {
    pub fn new() -> Result<Metrics, prometheus::Error> {
        let registry = Registry::new();
        let build = IntGaugeVec::new(
            Opts::new("warden_build_info", "Build information; always 1."),
            &["version"],
        )?;
        build.with_label_values(&[env!("CARGO_PKG_VERSION")]).set(1);
        let sealed = IntGauge::new(
            "warden_sealed",
            "1 while the master key is not available (waiting for unseal shares), else 0.",
        )?;
        let admin_requests = IntCounterVec::new(
            Opts::new(
                "warden_admin_requests_total",
                "Admin socket requests by operation and result.",
            ),
            &["op", "result"],
        )?;
        let audit_records = IntCounter::new(
            "warden_audit_records_written_total",
            "Audit records durably written.",
        )?;
        let audit_failures = IntCounter::new(
            "warden_audit_write_failures_total",
            "Audit records that could not be written (the audited action was refused).",
        )?;
        let svids_issued = IntCounter::new(
            "warden_svids_issued_total",
            "X.509-SVIDs issued to workloads (first issue and every rotation).",
        )?;
        let workload_api_denied = IntCounterVec::new(
            Opts::new(
                "warden_workload_api_denied_total",
                "Workload API requests refused because the caller matched no workload.",
            ),
            &["op"],
        )?;
        registry.register(Box::new(svids_issued.clone()))?;
        registry.register(Box::new(workload_api_denied.clone()))?;
        registry.register(Box::new(build))?;
        registry.register(Box::new(sealed.clone()))?;
        registry.register(Box::new(admin_requests.clone()))?;
        registry.register(Box::new(audit_records.clone()))?;
        registry.register(Box::new(audit_failures.clone()))?;
        Ok(Metrics {
            inner: Arc::new(Inner {
                registry,
                sealed,
                admin_requests,
                audit_records,
                audit_failures,
                svids_issued,
                workload_api_denied,
            }),
        })
    }

    pub fn set_sealed(&self, sealed: bool) {
        self.inner.sealed.set(i64::from(sealed));
    }

    pub fn is_sealed(&self) -> bool {
        self.inner.sealed.get() != 0
    }

    pub fn admin_request(&self, op: &str, result: &str) {
        self.inner
            .admin_requests
            .with_label_values(&[op, result])
            .inc();
    }

    pub fn audit_write(&self, ok: bool) {
        if ok {
            self.inner.audit_records.inc();
        } else {
            self.inner.audit_failures.inc();
        }
    }

    pub fn svid_issued(&self) {
        self.inner.svids_issued.inc();
    }

    /// `op` is a fixed Workload API method name (bounded label set).
    pub fn workload_api_denied(&self, op: &str) {
        self.inner
            .workload_api_denied
            .with_label_values(&[op])
            .inc();
    }

    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        let enc = TextEncoder::new();
        if enc.encode(&self.inner.registry.gather(), &mut buf).is_err() {
            return String::new();
        }
        String::from_utf8(buf).unwrap_or_default()
    }
}

fn respond(status: StatusCode, content_type: &str, body: String) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    if let Ok(v) = hyper::header::HeaderValue::from_str(content_type) {
        resp.headers_mut().insert(hyper::header::CONTENT_TYPE, v);
    }
    resp
}

fn route(metrics: &Metrics, req: &Request<hyper::body::Incoming>) -> Response<Full<Bytes>> {
    if req.method() != hyper::Method::GET && req.method() != hyper::Method::HEAD {
        return respond(
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain",
            "only GET is supported\n".into(),
        );
    }
    match req.uri().path() {
        "/metrics" => respond(
            StatusCode::OK,
            "text/plain; version=0.0.4; charset=utf-8",
            metrics.render(),
        ),
        "/healthz" => respond(StatusCode::OK, "text/plain", "ok\n".into()),
        "/readyz" => {
            if metrics.is_sealed() {
                respond(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "text/plain",
                    "sealed: provide unseal shares with `warden unseal`\n".into(),
                )
            } else {
                respond(StatusCode::OK, "text/plain", "ready\n".into())
            }
        }
        other => respond(
            StatusCode::NOT_FOUND,
            "text/plain",
            format!("no such endpoint {other:?}: try /metrics, /healthz or /readyz\n"),
        ),
    }
}

/// Binds the metrics endpoint. Binding happens before the daemon reports
/// readiness so a port conflict fails the start-up with a clear error.
pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr).await
}

/// Serves `/metrics`, `/healthz`, `/readyz` until the task is dropped.
pub async fn serve(listener: TcpListener, metrics: Metrics) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            continue;
        };
        let m = metrics.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req| {
                let resp = route(&m, &req);
                async move { Ok::<_, std::convert::Infallible>(resp) }
            });
            let io = hyper_util::rt::TokioIo::new(stream);
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(io, svc)
                .await;
        });
    }
}
