//! Prometheus metrics (`warden_` prefix) and the small HTTP endpoint that serves
//! them with `/healthz` and `/readyz`.
//!
//! Labels stay low-cardinality: operation names and results, never a secret
//! name, a pid or a path.

use http_body_util::Full;
use hyper::body::Bytes;
use hyper::{Request, Response, StatusCode};
use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
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
    sessions: IntCounterVec,
    session_seconds: HistogramVec,
    bytes: IntCounterVec,
    upstream_connect_seconds: HistogramVec,
    upstream_auth_seconds: HistogramVec,
    cancels: IntCounterVec,
    creds: CredentialMetrics,
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
        let sessions = IntCounterVec::new(
            Opts::new(
                "warden_sessions_total",
                "Proxy sessions by route and result (allowed, denied, upstream_error, upstream_rejected, protocol_error, ...).",
            ),
            &["route", "result"],
        )?;
        let session_seconds = HistogramVec::new(
            HistogramOpts::new(
                "warden_session_duration_seconds",
                "Length of relayed sessions.",
            )
            .buckets(vec![0.01, 0.1, 1.0, 10.0, 60.0, 600.0, 3600.0, 86400.0]),
            &["route"],
        )?;
        let bytes = IntCounterVec::new(
            Opts::new(
                "warden_relayed_bytes_total",
                "Bytes relayed, by route and direction (up = client to upstream).",
            ),
            &["route", "direction"],
        )?;
        let latency_buckets = vec![
            0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 5.0,
        ];
        let upstream_connect_seconds = HistogramVec::new(
            HistogramOpts::new(
                "warden_upstream_connect_seconds",
                "Time to open the upstream connection (TCP and TLS).",
            )
            .buckets(latency_buckets.clone()),
            &["route"],
        )?;
        let upstream_auth_seconds = HistogramVec::new(
            HistogramOpts::new(
                "warden_upstream_auth_seconds",
                "Time to authenticate upstream and reach ReadyForQuery.",
            )
            .buckets(latency_buckets),
            &["route"],
        )?;
        let cancels = IntCounterVec::new(
            Opts::new(
                "warden_pg_cancel_requests_total",
                "PostgreSQL cancel requests by result.",
            ),
            &["result"],
        )?;
        for c in [&sessions, &bytes, &cancels] {
            registry.register(Box::new(c.clone()))?;
        }
        for h in [
            &session_seconds,
            &upstream_connect_seconds,
            &upstream_auth_seconds,
        ] {
            registry.register(Box::new(h.clone()))?;
        }
        registry.register(Box::new(svids_issued.clone()))?;
        registry.register(Box::new(workload_api_denied.clone()))?;
        registry.register(Box::new(build))?;
        registry.register(Box::new(sealed.clone()))?;
        registry.register(Box::new(admin_requests.clone()))?;
        registry.register(Box::new(audit_records.clone()))?;
        registry.register(Box::new(audit_failures.clone()))?;
        let creds = CredentialMetrics::register(&registry)?;
        Ok(Metrics {
            inner: Arc::new(Inner {
                registry,
                sealed,
                admin_requests,
                audit_records,
                audit_failures,
                svids_issued,
                workload_api_denied,
                sessions,
                session_seconds,
                bytes,
                upstream_connect_seconds,
                upstream_auth_seconds,
                cancels,
                creds,
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

    /// `route` is a configured route name (bounded), `result` a fixed label.
    pub fn pg_session(&self, route: &str, result: &str) {
        self.inner
            .sessions
            .with_label_values(&[route, result])
            .inc();
    }

    pub fn pg_session_end(&self, route: &str, duration: std::time::Duration, up: u64, down: u64) {
        self.inner
            .session_seconds
            .with_label_values(&[route])
            .observe(duration.as_secs_f64());
        self.inner
            .bytes
            .with_label_values(&[route, "up"])
            .inc_by(up);
        self.inner
            .bytes
            .with_label_values(&[route, "down"])
            .inc_by(down);
    }

    pub fn pg_upstream_latency(
        &self,
        route: &str,
        connect: std::time::Duration,
        auth: std::time::Duration,
    ) {
        self.inner
            .upstream_connect_seconds
            .with_label_values(&[route])
            .observe(connect.as_secs_f64());
        self.inner
            .upstream_auth_seconds
            .with_label_values(&[route])
            .observe(auth.as_secs_f64());
    }

    pub fn pg_cancel(&self, result: &str) {
        self.inner.cancels.with_label_values(&[result]).inc();
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

/// Dynamic leases and secret rotation (issue 9).
struct CredentialMetrics {
    rotations: IntCounterVec,
    leases_active: IntGauge,
    leases_created: IntCounter,
    leases_revoked: IntCounter,
}

impl CredentialMetrics {
    fn register(registry: &Registry) -> Result<CredentialMetrics, prometheus::Error> {
        let rotations = IntCounterVec::new(
            Opts::new(
                "warden_secret_rotations_total",
                "Secret rotations by result (success, failure, recovered).",
            ),
            &["result"],
        )?;
        let leases_active = IntGauge::new(
            "warden_leases_active",
            "Dynamic credential leases (database roles) currently held.",
        )?;
        let leases_created = IntCounter::new(
            "warden_leases_created_total",
            "Dynamic credential leases created (one database role each).",
        )?;
        let leases_revoked = IntCounter::new(
            "warden_leases_revoked_total",
            "Dynamic credential leases revoked (role dropped), orphans included.",
        )?;
        for c in [&leases_created, &leases_revoked] {
            registry.register(Box::new(c.clone()))?;
        }
        registry.register(Box::new(rotations.clone()))?;
        registry.register(Box::new(leases_active.clone()))?;
        for r in ["success", "failure", "recovered"] {
            rotations.with_label_values(&[r]);
        }
        Ok(CredentialMetrics {
            rotations,
            leases_active,
            leases_created,
            leases_revoked,
        })
    }
}

impl Metrics {
    /// `result`: `success`, `failure` or `recovered` (a crashed rotation finished or rolled back).
    pub fn secret_rotation(&self, result: &str) {
        self.inner
            .creds
            .rotations
            .with_label_values(&[result])
            .inc();
    }

    pub fn lease_created(&self) {
        self.inner.creds.leases_created.inc();
    }

    pub fn lease_revoked(&self) {
        self.inner.creds.leases_revoked.inc();
    }

    pub fn set_leases_active(&self, n: usize) {
        self.inner
            .creds
            .leases_active
            .set(i64::try_from(n).unwrap_or(i64::MAX));
    }
}
