//! Prometheus metrics (`warden_` prefix) and the small HTTP endpoint that serves
//! them with `/healthz` and `/readyz`.
//!
//! Labels stay low-cardinality: route and workload names (both come from the
//! configuration), fixed operation, kind and result names — never a secret
//! name, a pid, a path or anything a client chooses.
//!
//! Counters and histograms are updated where things happen. Gauges that
//! describe state (seconds until the soonest SVID expiry, secret ages, …) are
//! refreshed at scrape time by hooks registered with [`Metrics::on_scrape`];
//! `/readyz` runs the checks registered with [`Metrics::readiness_check`].
//! `observe.rs` installs both for the daemon.

use http_body_util::Full;
use hyper::body::Bytes;
use hyper::{Request, Response, StatusCode};
use prometheus::{
    Encoder, Gauge, GaugeVec, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::net::TcpListener;

/// A scrape-time refresher of state gauges.
pub type ScrapeHook = Box<dyn Fn(&Metrics) + Send + Sync>;
/// A `/readyz` condition: `Err(why)` makes warden not ready.
pub type ReadinessCheck = Box<dyn Fn(&Metrics) -> Result<(), String> + Send + Sync>;
/// A line `/readyz` adds to its answer (ready or not) without deciding it.
pub type ReadinessNote = Box<dyn Fn() -> Option<String> + Send + Sync>;

/// One http route's per-request metrics, resolved once.
#[derive(Clone)]
pub struct HttpRouteMetrics {
    pub forwarded: prometheus::IntCounter,
    pub added: prometheus::Histogram,
}

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
    audit_sync_failures: IntCounter,
    // Identity.
    svids_issued: IntCounter,
    svid_issuance_errors: IntCounter,
    svid_soonest_expiry: GaugeVec,
    ca_expiry: GaugeVec,
    svid_ttl: Gauge,
    workload_api_denied: IntCounterVec,
    workload_api_streams: IntGaugeVec,
    // Sessions.
    sessions: IntCounterVec,
    session_seconds: HistogramVec,
    bytes: IntCounterVec,
    upstream_connect_seconds: HistogramVec,
    upstream_auth_seconds: HistogramVec,
    attestation_seconds: HistogramVec,
    cancels: IntCounterVec,
    pool_events: IntCounterVec,
    pool_idle: IntGaugeVec,
    kernel_relay: IntCounterVec,
    redis_kernel_relay: IntCounterVec,
    mysql_kernel_relay: IntCounterVec,
    // Secrets.
    secrets: IntGauge,
    secret_versions: IntGauge,
    secret_age: GaugeVec,
    secret_rotation_period: GaugeVec,
    // Families of the monitor, anomaly, HTTP, lease and rotation subsystems.
    monitor_events: IntCounterVec,
    monitor_events_lost: IntCounter,
    monitor_kernel_hops: IntCounter,
    monitor_connects_denied: IntCounter,
    monitor_bypass_attempts: IntCounter,
    monitor_mode: IntGaugeVec,
    monitor_events_dropped: IntCounter,
    monitor_attributions: IntCounterVec,
    anomaly_detections: IntCounterVec,
    frozen_workloads: IntGauge,
    anomaly_alerts: IntCounterVec,
    anomaly_signals_dropped: IntCounter,
    export_sent: IntCounterVec,
    export_errors: IntCounterVec,
    export_dropped: IntCounterVec,
    secret_rotations: IntCounterVec,
    leases_active: IntGauge,
    leases_created: IntCounter,
    leases_revoked: IntCounter,
    // The shared store (PostgreSQL only).
    store_up: IntGaugeVec,
    store_unreachable: GaugeVec,
    stale_served: IntCounterVec,
    // Fleet views (PostgreSQL only; see `crate::fleet_views`).
    audit_shipped: IntCounter,
    audit_ship_lag_records: IntGauge,
    audit_ship_lag_seconds: Gauge,
    events_shipped: IntCounter,
    events_not_shipped: IntCounter,
    fleet_ship_errors: IntCounterVec,
    http_added_seconds: HistogramVec,
    http_requests: IntCounterVec,
    // Scrape hooks and readiness checks.
    hooks: Mutex<Vec<ScrapeHook>>,
    checks: Mutex<Vec<ReadinessCheck>>,
    notes: Mutex<Vec<ReadinessNote>>,
}

/// Buckets for per-connection latencies (seconds): 100 µs to 5 s.
const LATENCY_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 5.0,
];

/// Which route kind's kernel relay a hand-over counts for
/// (`warden_pg_kernel_relay_total`, `warden_redis_kernel_relay_total` or
/// `warden_mysql_kernel_relay_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RelayKind {
    Postgres,
    Redis,
    Mysql,
}

/// Where a caller was attested (`via` label of `warden_attestation_seconds`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttestVia {
    Postgres,
    Http,
    Tls,
    Redis,
    Mysql,
    WorkloadApi,
}

impl AttestVia {
    pub fn as_str(self) -> &'static str {
        match self {
            AttestVia::Postgres => "postgres",
            AttestVia::Http => "http",
            AttestVia::Tls => "tls",
            AttestVia::Redis => "redis",
            AttestVia::Mysql => "mysql",
            AttestVia::WorkloadApi => "workload_api",
        }
    }
}

// ---------------------------------------------------------------------------
// Metric families of the monitor, anomaly detection, HTTP routes, dynamic
// credentials and rotation. Registered (at zero) from the start so
// dashboards and alert rules can rely on them; the subsystems call the
// methods in the second `impl Metrics` block below.
// ---------------------------------------------------------------------------

/// `kind` label of `warden_monitor_events_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MonitorEventKind {
    /// A `connect()` seen by cgroup/connect4 or connect6 (to a listener or a
    /// protected upstream, or any connect of a frozen process).
    Connect,
    /// A client connection to a warden listener, attributed to its process (sock_ops).
    Attributed,
}

/// `verdict` label of `warden_monitor_events_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MonitorVerdict {
    /// Permitted (through warden, or not a protected destination).
    Allowed,
    /// Refused because the process or its cgroup is frozen.
    DeniedFrozen,
    /// A direct connect to a protected upstream, let through (`observe`).
    BypassObserved,
    /// A direct connect to a protected upstream, refused (`enforce`).
    BypassDenied,
}

impl MonitorEventKind {
    pub fn as_str(self) -> &'static str {
        match self {
            MonitorEventKind::Connect => "connect",
            MonitorEventKind::Attributed => "attributed",
        }
    }
}

impl MonitorVerdict {
    pub fn as_str(self) -> &'static str {
        match self {
            MonitorVerdict::Allowed => "allowed",
            MonitorVerdict::DeniedFrozen => "denied_frozen",
            MonitorVerdict::BypassObserved => "bypass_observed",
            MonitorVerdict::BypassDenied => "bypass_denied",
        }
    }
}

/// The (kind, verdict) pairs exported at zero from start-up.
const MONITOR_EVENT_SERIES: &[(MonitorEventKind, MonitorVerdict)] = &[
    (MonitorEventKind::Connect, MonitorVerdict::Allowed),
    (MonitorEventKind::Connect, MonitorVerdict::DeniedFrozen),
    (MonitorEventKind::Connect, MonitorVerdict::BypassObserved),
    (MonitorEventKind::Connect, MonitorVerdict::BypassDenied),
    (MonitorEventKind::Attributed, MonitorVerdict::Allowed),
];

/// `mode` label of `warden_monitor_mode` (exactly one is 1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MonitorMode {
    /// eBPF programs loaded and attached.
    Ebpf,
    /// Fallback: /proc polling only.
    Procfs,
    /// No monitor running.
    Off,
}

impl MonitorMode {
    pub const ALL: [MonitorMode; 3] = [MonitorMode::Ebpf, MonitorMode::Procfs, MonitorMode::Off];
    pub fn as_str(self) -> &'static str {
        match self {
            MonitorMode::Ebpf => "ebpf",
            MonitorMode::Procfs => "procfs",
            MonitorMode::Off => "off",
        }
    }
}

/// Anomaly rules (`[anomaly]` keys) exported at zero from start-up.
pub const ANOMALY_RULES: &[&str] = &[
    "distinct_secrets_per_minute",
    "session_rate",
    "new_executable",
    "denials_per_minute",
    "bypass",
];
/// `result` values of `warden_anomaly_alerts_total`.
pub const ANOMALY_ALERT_RESULTS: &[&str] = &["delivered", "retried", "failed", "dropped"];
/// `action` values of `warden_anomaly_detections_total` (`anomaly.*.action`).
pub const ANOMALY_ACTIONS: &[&str] = &["log", "alert", "freeze"];

fn reg<C: prometheus::core::Collector + Clone + 'static>(
    registry: &Registry,
    c: &C,
) -> Result<(), prometheus::Error> {
    registry.register(Box::new(c.clone()))
}

impl Metrics {
    pub fn new() -> Result<Metrics, prometheus::Error> {
        let registry = Registry::new();
        let build = IntGaugeVec::new(
            Opts::new("warden_build_info", "Build information; always 1."),
            &["version"],
        )?;
        build.with_label_values(&[env!("CARGO_PKG_VERSION")]).set(1);
        reg(&registry, &build)?;
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
            "Audit records written (durably, or to the OS with audit.sync = \"interval\").",
        )?;
        let audit_failures = IntCounter::new(
            "warden_audit_write_failures_total",
            "Audit records that could not be written (the audited action was refused).",
        )?;
        let audit_sync_failures = IntCounter::new(
            "warden_audit_sync_failures_total",
            "Background fsyncs of the audit log that failed (audit.sync = \"interval\"); after one, every audited action is refused until warden is restarted.",
        )?;

        let svids_issued = IntCounter::new(
            "warden_svids_issued_total",
            "X.509-SVIDs issued to workloads (first issue and every rotation).",
        )?;
        let svid_issuance_errors = IntCounter::new(
            "warden_svid_issuance_errors_total",
            "Failed SVID issuances and failed identity maintenance runs (SVID refresh, CA rotation).",
        )?;
        let svid_soonest_expiry = GaugeVec::new(
            Opts::new(
                "warden_svid_soonest_expiry_seconds",
                "Seconds until the soonest-expiring SVID warden holds for a workload expires (identity.svid_ttl while none is held).",
            ),
            &[],
        )?;
        let ca_expiry = GaugeVec::new(
            Opts::new(
                "warden_ca_expiry_seconds",
                "Seconds until the CA that signs new SVIDs expires (absent while sealed or loading).",
            ),
            &[],
        )?;
        let svid_ttl = Gauge::new(
            "warden_svid_ttl_seconds",
            "Configured lifetime of issued SVIDs (identity.svid_ttl).",
        )?;
        let workload_api_denied = IntCounterVec::new(
            Opts::new(
                "warden_workload_api_denied_total",
                "Workload API requests refused because the caller matched no workload.",
            ),
            &["op"],
        )?;
        for op in [
            "FetchX509SVID",
            "FetchX509Bundles",
            "FetchJWTSVID",
            "FetchJWTBundles",
            "ValidateJWTSVID",
        ] {
            workload_api_denied.with_label_values(&[op]);
        }
        let workload_api_streams = IntGaugeVec::new(
            Opts::new(
                "warden_workload_api_streams",
                "Workload API streams open now, by method.",
            ),
            &["op"],
        )?;
        for op in ["FetchX509SVID", "FetchX509Bundles", "FetchJWTBundles"] {
            workload_api_streams.with_label_values(&[op]).set(0);
        }

        let sessions = IntCounterVec::new(
            Opts::new(
                "warden_sessions_total",
                "Proxy sessions by route, attested workload (empty when unattested) and result (allowed, denied, upstream_error, upstream_rejected, credential_error, protocol_error, tls_error, audit_error, frozen, ...).",
            ),
            &["route", "workload", "result"],
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
        let upstream_connect_seconds = HistogramVec::new(
            HistogramOpts::new(
                "warden_upstream_connect_seconds",
                "Time to open the upstream connection (TCP and TLS).",
            )
            .buckets(LATENCY_BUCKETS.to_vec()),
            &["route"],
        )?;
        let upstream_auth_seconds = HistogramVec::new(
            HistogramOpts::new(
                "warden_upstream_auth_seconds",
                "Time to authenticate upstream and reach ReadyForQuery.",
            )
            .buckets(LATENCY_BUCKETS.to_vec()),
            &["route"],
        )?;
        let attestation_seconds = HistogramVec::new(
            HistogramOpts::new(
                "warden_attestation_seconds",
                "Time to attribute a connection to its process and attest it against the workload registrations, by listener kind and result (ok, denied).",
            )
            .buckets(LATENCY_BUCKETS.to_vec()),
            &["via", "result"],
        )?;
        for via in [
            AttestVia::Postgres,
            AttestVia::Http,
            AttestVia::Tls,
            AttestVia::Redis,
            AttestVia::Mysql,
            AttestVia::WorkloadApi,
        ] {
            attestation_seconds.with_label_values(&[via.as_str(), "ok"]);
        }
        let cancels = IntCounterVec::new(
            Opts::new(
                "warden_pg_cancel_requests_total",
                "PostgreSQL cancel requests by result.",
            ),
            &["result"],
        )?;
        for r in ["forwarded", "unknown_key"] {
            cancels.with_label_values(&[r]);
        }
        let pool_events = IntCounterVec::new(
            Opts::new(
                "warden_pg_pool_total",
                "PostgreSQL, MySQL and Redis upstream pool events by route: hit (a session got an idle authenticated connection), miss (a new login), returned (reset and kept idle), reset_failed (closed instead), closed (idle connection dropped: timeout, lifetime, dead, superseded credential, full).",
            ),
            &["route", "result"],
        )?;
        let kernel_relay = IntCounterVec::new(
            Opts::new(
                "warden_pg_kernel_relay_total",
                "Long PostgreSQL sessions offered to the eBPF kernel relay by route and result: spliced (the kernel moves its bytes between the client's and the upstream's sockets from then on), busy (bytes still queued; offered again later), not_local (the client or the upstream is not on this host, or the kernel refused; relayed in user space), tcp_path (a spliced session whose client sent before it could be redirected — a pipelining client — so warden relayed it all, in order; counted at its end).",
            ),
            &["route", "result"],
        )?;
        let redis_kernel_relay = IntCounterVec::new(
            Opts::new(
                "warden_redis_kernel_relay_total",
                "Long Redis sessions offered to the eBPF kernel relay by route and result: spliced (the kernel moves its bytes between the client's and the upstream's sockets from then on), busy (bytes still queued; offered again later), not_local (the client or the upstream is not on this host, or the kernel refused; relayed in user space), tcp_path (a spliced session whose client sent before it could be redirected — a pipelining client — so warden relayed it all, in order; counted at its end), unspliced (a spliced session whose client sent a command the route's command list leaves to warden: handed back to user space, which decides it and relays the rest).",
            ),
            &["route", "result"],
        )?;
        let mysql_kernel_relay = IntCounterVec::new(
            Opts::new(
                "warden_mysql_kernel_relay_total",
                "Long MySQL/MariaDB sessions offered to the eBPF kernel relay by route and result: spliced (the kernel moves its bytes between the client's and the upstream's sockets from then on), busy (bytes still queued; offered again later), not_local (the client or the upstream is not on this host, or the kernel refused; relayed in user space), tcp_path (a spliced session whose client sent before it could be redirected — a pipelining client — so warden relayed it all, in order; counted at its end).",
            ),
            &["route", "result"],
        )?;
        let pool_idle = IntGaugeVec::new(
            Opts::new(
                "warden_pg_pool_idle_connections",
                "Idle authenticated upstream connections kept per PostgreSQL, MySQL or Redis route.",
            ),
            &["route"],
        )?;

        let secrets = IntGauge::new(
            "warden_secrets",
            "Secrets in the store (name and environment pairs; warden's own keys excluded).",
        )?;
        let secret_versions = IntGauge::new(
            "warden_secret_versions",
            "Secret versions kept in the store (warden's own keys excluded).",
        )?;
        let secret_age = GaugeVec::new(
            Opts::new(
                "warden_secret_rotation_age_seconds",
                "Seconds since the current version of the secret a route uses was written.",
            ),
            &["route"],
        )?;
        let secret_rotation_period = GaugeVec::new(
            Opts::new(
                "warden_secret_rotation_period_seconds",
                "Configured secret[].rotation_period of the secret a route uses.",
            ),
            &["route"],
        )?;

        // Subsystem families (see the marked section above).
        let monitor_events = IntCounterVec::new(
            Opts::new(
                "warden_monitor_events_total",
                "Kernel events handled by the monitor, by kind (connect, attributed) and verdict (allowed, denied_frozen, bypass_observed, bypass_denied).",
            ),
            &["kind", "verdict"],
        )?;
        for (k, v) in MONITOR_EVENT_SERIES {
            monitor_events.with_label_values(&[k.as_str(), v.as_str()]);
        }
        let monitor_events_lost = IntCounter::new(
            "warden_monitor_events_lost_total",
            "Kernel events lost before the monitor read them (ring buffer full).",
        )?;
        let monitor_kernel_hops = IntCounter::new(
            "warden_monitor_kernel_hops_total",
            "Connection directions of warden's local hops (http routes with kernel_relay) that the kernel joined socket to socket.",
        )?;
        let monitor_connects_denied = IntCounter::new(
            "warden_monitor_connects_denied_total",
            "connect() calls refused in the kernel (frozen workloads, protect_upstreams = \"enforce\").",
        )?;
        let monitor_bypass_attempts = IntCounter::new(
            "warden_monitor_bypass_attempts_total",
            "Processes that tried to reach a protected upstream without going through warden.",
        )?;
        let monitor_events_dropped = IntCounter::new(
            "warden_monitor_events_dropped_total",
            "Kernel events counted but not shown by `warden events` (the enrichment queue was full).",
        )?;
        let monitor_attributions = IntCounterVec::new(
            Opts::new(
                "warden_monitor_attributions_total",
                "Accepted TCP connections attributed to a process, by source: ebpf (the sock_ops map) or procfs_fallback (a miss in the map).",
            ),
            &["source"],
        )?;
        for source in ["ebpf", "procfs_fallback"] {
            monitor_attributions.with_label_values(&[source]);
        }
        let monitor_mode = IntGaugeVec::new(
            Opts::new(
                "warden_monitor_mode",
                "How the monitor runs: 1 for the current mode (ebpf, procfs fallback, off), 0 for the others.",
            ),
            &["mode"],
        )?;
        for m in MonitorMode::ALL {
            monitor_mode
                .with_label_values(&[m.as_str()])
                .set(i64::from(m == MonitorMode::Off));
        }
        let anomaly_detections = IntCounterVec::new(
            Opts::new(
                "warden_anomaly_detections_total",
                "Anomaly rule detections by rule ([anomaly] key) and action taken (log, alert, freeze).",
            ),
            &["rule", "action"],
        )?;
        for rule in ANOMALY_RULES {
            for action in ANOMALY_ACTIONS {
                anomaly_detections.with_label_values(&[rule, action]);
            }
        }
        let frozen_workloads = IntGauge::new(
            "warden_frozen_workloads",
            "Workloads frozen now (refused secrets and sessions until an admin thaws them).",
        )?;
        let anomaly_alerts = IntCounterVec::new(
            Opts::new(
                "warden_anomaly_alerts_total",
                "Anomaly webhook deliveries by result (delivered, retried, failed, dropped).",
            ),
            &["result"],
        )?;
        for r in ANOMALY_ALERT_RESULTS {
            anomaly_alerts.with_label_values(&[r]);
        }
        let anomaly_signals_dropped = IntCounter::new(
            "warden_anomaly_signals_dropped_total",
            "Events the anomaly detector never saw because its queue was full.",
        )?;
        let export_sent = IntCounterVec::new(
            Opts::new(
                "warden_export_sent_total",
                "Events and audit records delivered by each [[export.sink]].",
            ),
            &["sink"],
        )?;
        let export_errors = IntCounterVec::new(
            Opts::new(
                "warden_export_errors_total",
                "Failed delivery attempts of each [[export.sink]] (each retry counts).",
            ),
            &["sink"],
        )?;
        let export_dropped = IntCounterVec::new(
            Opts::new(
                "warden_export_dropped_total",
                "Entries an [[export.sink]] never delivered, by reason: queue_full (the receiver is slow or down), rate_limited (export.rate_per_workload), failed (delivery gave up).",
            ),
            &["sink", "reason"],
        )?;
        let secret_rotations = IntCounterVec::new(
            Opts::new(
                "warden_secret_rotations_total",
                "Secret rotations by result (success, failure, recovered: a crashed rotation finished or rolled back).",
            ),
            &["result"],
        )?;
        for r in ["success", "failure", "recovered"] {
            secret_rotations.with_label_values(&[r]);
        }
        let leases_active = IntGauge::new(
            "warden_leases_active",
            "Dynamic credential leases alive now.",
        )?;
        let leases_created = IntCounter::new(
            "warden_leases_created_total",
            "Dynamic credential leases created.",
        )?;
        let leases_revoked = IntCounter::new(
            "warden_leases_revoked_total",
            "Dynamic credential leases revoked (expiry, session end or admin).",
        )?;
        let http_requests = IntCounterVec::new(
            Opts::new(
                "warden_http_requests_total",
                "HTTP route requests by route and result (forwarded, denied, rejected, upstream_error, upstream_tls_error, upstream_timeout, credential_error, tunnel, ...).",
            ),
            &["route", "result"],
        )?;
        let http_added_seconds = HistogramVec::new(
            HistogramOpts::new(
                "warden_http_request_added_seconds",
                "Latency warden adds to an HTTP request (time not spent waiting for the upstream), by route.",
            )
            .buckets(LATENCY_BUCKETS.to_vec()),
            &["route"],
        )?;

        reg(&registry, &sealed)?;
        reg(&registry, &admin_requests)?;
        reg(&registry, &audit_records)?;
        reg(&registry, &audit_failures)?;
        reg(&registry, &audit_sync_failures)?;
        reg(&registry, &svids_issued)?;
        reg(&registry, &svid_issuance_errors)?;
        reg(&registry, &svid_soonest_expiry)?;
        reg(&registry, &ca_expiry)?;
        reg(&registry, &svid_ttl)?;
        reg(&registry, &workload_api_denied)?;
        reg(&registry, &workload_api_streams)?;
        reg(&registry, &sessions)?;
        reg(&registry, &session_seconds)?;
        reg(&registry, &bytes)?;
        reg(&registry, &upstream_connect_seconds)?;
        reg(&registry, &upstream_auth_seconds)?;
        reg(&registry, &attestation_seconds)?;
        reg(&registry, &cancels)?;
        reg(&registry, &pool_events)?;
        reg(&registry, &pool_idle)?;
        reg(&registry, &kernel_relay)?;
        reg(&registry, &redis_kernel_relay)?;
        reg(&registry, &mysql_kernel_relay)?;
        reg(&registry, &secrets)?;
        reg(&registry, &secret_versions)?;
        reg(&registry, &secret_age)?;
        reg(&registry, &secret_rotation_period)?;
        reg(&registry, &monitor_events)?;
        reg(&registry, &monitor_events_lost)?;
        reg(&registry, &monitor_kernel_hops)?;
        reg(&registry, &monitor_connects_denied)?;
        reg(&registry, &monitor_bypass_attempts)?;
        reg(&registry, &monitor_mode)?;
        reg(&registry, &monitor_events_dropped)?;
        reg(&registry, &monitor_attributions)?;
        reg(&registry, &anomaly_detections)?;
        reg(&registry, &frozen_workloads)?;
        reg(&registry, &anomaly_alerts)?;
        reg(&registry, &anomaly_signals_dropped)?;
        reg(&registry, &export_sent)?;
        reg(&registry, &export_errors)?;
        reg(&registry, &export_dropped)?;
        reg(&registry, &secret_rotations)?;
        reg(&registry, &leases_active)?;
        reg(&registry, &leases_created)?;
        reg(&registry, &leases_revoked)?;
        let store_up = IntGaugeVec::new(
            Opts::new(
                "warden_store_up",
                "1 while the store is reachable, 0 while a shared (PostgreSQL) store is not (always 1 on the SQLite store, a local file).",
            ),
            &[],
        )?;
        let store_unreachable = GaugeVec::new(
            Opts::new(
                "warden_store_unreachable_seconds",
                "Seconds since the shared (PostgreSQL) store was last reachable (0 while it is, and always on the SQLite store).",
            ),
            &[],
        )?;
        let stale_served = IntCounterVec::new(
            Opts::new(
                "warden_credentials_stale_served_total",
                "Credentials served from the cache past their cache_ttl because the shared store was unreachable (store.stale_if_error).",
            ),
            &["route"],
        )?;
        reg(&registry, &store_up)?;
        reg(&registry, &store_unreachable)?;
        reg(&registry, &stale_served)?;
        let audit_shipped = IntCounter::new(
            "warden_audit_shipped_records_total",
            "Audit records this node copied to the shared (PostgreSQL) store.",
        )?;
        let audit_ship_lag_records = IntGauge::new(
            "warden_audit_ship_lag_records",
            "Audit records written to this node's local log and not yet in the shared store (0 on the SQLite store).",
        )?;
        let audit_ship_lag_seconds = Gauge::new(
            "warden_audit_ship_lag_seconds",
            "Age of the oldest audit record not yet copied to the shared store (0 when none waits).",
        )?;
        let events_shipped = IntCounter::new(
            "warden_events_shipped_total",
            "Access event summaries this node copied to the shared store.",
        )?;
        let events_not_shipped = IntCounter::new(
            "warden_events_not_shipped_total",
            "Access events that left the daemon's in-memory feed before they were copied to the shared store.",
        )?;
        let fleet_ship_errors = IntCounterVec::new(
            Opts::new(
                "warden_fleet_ship_errors_total",
                "Failed attempts to copy to the shared store, by what (connect, audit, events, freeze_acks).",
            ),
            &["what"],
        )?;
        reg(&registry, &audit_shipped)?;
        reg(&registry, &audit_ship_lag_records)?;
        reg(&registry, &audit_ship_lag_seconds)?;
        reg(&registry, &events_shipped)?;
        reg(&registry, &events_not_shipped)?;
        reg(&registry, &fleet_ship_errors)?;
        // Every series exists from the start (0 on a single node).
        for what in ["connect", "audit", "events", "freeze_acks"] {
            fleet_ship_errors.with_label_values(&[what]);
        }
        reg(&registry, &http_added_seconds)?;
        reg(&registry, &http_requests)?;
        Ok(Metrics {
            inner: Arc::new(Inner {
                registry,
                sealed,
                admin_requests,
                audit_records,
                audit_failures,
                audit_sync_failures,
                svids_issued,
                svid_issuance_errors,
                svid_soonest_expiry,
                ca_expiry,
                svid_ttl,
                workload_api_denied,
                workload_api_streams,
                sessions,
                session_seconds,
                bytes,
                upstream_connect_seconds,
                upstream_auth_seconds,
                attestation_seconds,
                cancels,
                pool_events,
                pool_idle,
                kernel_relay,
                redis_kernel_relay,
                mysql_kernel_relay,
                secrets,
                secret_versions,
                secret_age,
                secret_rotation_period,
                monitor_events,
                monitor_events_lost,
                monitor_kernel_hops,
                monitor_connects_denied,
                monitor_bypass_attempts,
                monitor_mode,
                monitor_events_dropped,
                monitor_attributions,
                anomaly_detections,
                frozen_workloads,
                anomaly_alerts,
                anomaly_signals_dropped,
                export_sent,
                export_errors,
                export_dropped,
                secret_rotations,
                leases_active,
                leases_created,
                leases_revoked,
                store_up,
                store_unreachable,
                stale_served,
                audit_shipped,
                audit_ship_lag_records,
                audit_ship_lag_seconds,
                events_shipped,
                events_not_shipped,
                fleet_ship_errors,
                http_added_seconds,
                http_requests,
                hooks: Mutex::new(Vec::new()),
                checks: Mutex::new(Vec::new()),
                notes: Mutex::new(Vec::new()),
            }),
        })
    }

    /// Runs `hook` before every scrape (on a blocking thread: it may lock the
    /// service or the identity state).
    pub fn on_scrape(&self, hook: ScrapeHook) {
        if let Ok(mut h) = self.inner.hooks.lock() {
            h.push(hook);
        }
    }

    /// Adds a condition to `/readyz` (the sealed check is built in).
    pub fn readiness_check(&self, check: ReadinessCheck) {
        if let Ok(mut c) = self.inner.checks.lock() {
            c.push(check);
        }
    }

    /// Adds a line to `/readyz`'s answer that does not decide readiness.
    pub fn readiness_note(&self, note: ReadinessNote) {
        if let Ok(mut n) = self.inner.notes.lock() {
            n.push(note);
        }
    }

    /// The notes `/readyz` adds to its answer.
    pub fn readiness_notes(&self) -> Vec<String> {
        match self.inner.notes.lock() {
            Ok(n) => n.iter().filter_map(|f| f()).collect(),
            Err(_) => Vec::new(),
        }
    }

    /// Audit records copied to the shared store.
    pub fn audit_shipped(&self, n: u64) {
        self.inner.audit_shipped.inc_by(n);
    }

    /// Audit records not yet in the shared store, and the oldest one's age.
    pub fn set_audit_ship_lag(&self, records: u64, seconds: f64) {
        self.inner
            .audit_ship_lag_records
            .set(i64::try_from(records).unwrap_or(i64::MAX));
        self.inner.audit_ship_lag_seconds.set(seconds);
    }

    /// Event summaries copied to the shared store.
    pub fn events_shipped(&self, n: u64) {
        self.inner.events_shipped.inc_by(n);
    }

    /// Events that left the feed before they were copied.
    pub fn events_not_shipped(&self, n: u64) {
        self.inner.events_not_shipped.inc_by(n);
    }

    /// A failed copy to the shared store (`what` is a fixed name).
    pub fn fleet_ship_error(&self, what: &str) {
        self.inner
            .fleet_ship_errors
            .with_label_values(&[what])
            .inc();
    }

    /// Why warden is not ready, one reason per entry; empty when ready.
    pub fn not_ready_reasons(&self) -> Vec<String> {
        let mut why = Vec::new();
        if self.is_sealed() {
            why.push("sealed: provide unseal shares with `warden unseal`".to_string());
        }
        if let Ok(checks) = self.inner.checks.lock() {
            why.extend(checks.iter().filter_map(|c| c(self).err()));
        }
        why
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

    pub fn audit_sync_failed(&self) {
        self.inner.audit_sync_failures.inc();
    }

    pub fn audit_write(&self, ok: bool) {
        if ok {
            self.inner.audit_records.inc();
        } else {
            self.inner.audit_failures.inc();
        }
    }

    // ---- identity ----------------------------------------------------------

    pub fn svid_issued(&self) {
        self.inner.svids_issued.inc();
    }

    pub fn svid_issuance_error(&self) {
        self.inner.svid_issuance_errors.inc();
    }

    /// Seconds until the soonest SVID and the signing CA expire (`None`:
    /// nothing held, the series disappears).
    pub fn set_identity_expiry(&self, soonest_svid: Option<f64>, ca: Option<f64>) {
        // No SVID held yet: the first one issued will last a full
        // `svid_ttl`, so that is the soonest any can expire (the series
        // exists from the start; the expiry alert stays quiet).
        self.inner
            .svid_soonest_expiry
            .with_label_values(&[])
            .set(soonest_svid.unwrap_or_else(|| self.inner.svid_ttl.get()));
        match ca {
            Some(s) => self.inner.ca_expiry.with_label_values(&[]).set(s),
            None => self.inner.ca_expiry.reset(),
        }
    }

    /// The shared store's state: `None` while it is reachable, else how
    /// long it has been unreachable.
    pub fn set_store_unreachable(&self, lasted: Option<Duration>) {
        self.inner
            .store_up
            .with_label_values(&[])
            .set(i64::from(lasted.is_none()));
        self.inner
            .store_unreachable
            .with_label_values(&[])
            .set(lasted.map_or(0.0, |d| d.as_secs_f64()));
    }

    /// A credential served past its `cache_ttl` during a store outage.
    pub fn stale_credential_served(&self, route: &str) {
        self.inner.stale_served.with_label_values(&[route]).inc();
    }

    pub fn set_svid_ttl(&self, ttl: Duration) {
        self.inner.svid_ttl.set(ttl.as_secs_f64());
    }

    /// `op` is a fixed Workload API method name (bounded label set).
    pub fn workload_api_denied(&self, op: &str) {
        self.inner
            .workload_api_denied
            .with_label_values(&[op])
            .inc();
    }

    /// Counts an open Workload API stream until the guard is dropped.
    pub fn workload_api_stream(&self, op: &'static str) -> GaugeGuard {
        let g = self.inner.workload_api_streams.with_label_values(&[op]);
        g.inc();
        GaugeGuard(g)
    }

    /// How long attributing and attesting one caller took.
    pub fn attestation(&self, via: AttestVia, ok: bool, took: Duration) {
        self.inner
            .attestation_seconds
            .with_label_values(&[via.as_str(), if ok { "ok" } else { "denied" }])
            .observe(took.as_secs_f64());
    }

    // ---- sessions ----------------------------------------------------------

    /// Exports a configured route's series at zero, so rates start from the
    /// first session: `allowed` for each workload the route admits.
    pub fn declare_route(&self, route: &str, http: bool, allowed: &[String]) {
        for w in allowed {
            self.inner
                .sessions
                .with_label_values(&[route, w, "allowed"]);
        }
        // Every route's session series exist from the start, so a fresh
        // dashboard shows zeros, not "No data".
        self.inner.session_seconds.with_label_values(&[route]);
        self.inner.stale_served.with_label_values(&[route]);
        for direction in ["up", "down"] {
            self.inner.bytes.with_label_values(&[route, direction]);
        }
        if http {
            self.inner.http_added_seconds.with_label_values(&[route]);
        } else {
            self.inner
                .upstream_connect_seconds
                .with_label_values(&[route]);
            self.inner.upstream_auth_seconds.with_label_values(&[route]);
        }
    }

    /// A session that ended before its workload was known (`route` is a
    /// configured route name, `result` a fixed label).
    pub fn session_unattested(&self, route: &str, result: &str) {
        self.session(route, "", result);
    }

    /// A session of attested workload `workload` (a configured name).
    pub fn session(&self, route: &str, workload: &str, result: &str) {
        self.inner
            .sessions
            .with_label_values(&[route, workload, result])
            .inc();
    }

    /// A relayed session ended (every route kind): its length and bytes.
    pub fn session_end(&self, route: &str, duration: Duration, up: u64, down: u64) {
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

    /// Time to connect to a route's upstream and to authenticate there.
    pub fn upstream_latency(&self, route: &str, connect: Duration, auth: Duration) {
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

    /// Exports a pooled route's series at zero.
    pub fn pg_pool_declare(&self, route: &str) {
        for e in [
            "hit",
            "miss",
            "returned",
            "reset_skipped",
            "reset_failed",
            "closed",
        ] {
            self.inner.pool_events.with_label_values(&[route, e]);
        }
        self.inner.pool_idle.with_label_values(&[route]);
    }

    /// A pool event (`event` a fixed label) on a configured route.
    pub fn pg_pool(&self, route: &str, event: &str) {
        self.inner
            .pool_events
            .with_label_values(&[route, event])
            .inc();
    }

    /// Exports a kernel-relay route's series at zero.
    pub fn kernel_relay_declare(&self, kind: RelayKind, route: &str) {
        for r in ["spliced", "busy", "not_local", "tcp_path"] {
            self.kernel_relay_family(kind)
                .with_label_values(&[route, r]);
        }
    }

    /// A hand-over attempt's result (a fixed label) on a configured route.
    pub fn kernel_relay(&self, kind: RelayKind, route: &str, result: &str) {
        self.kernel_relay_family(kind)
            .with_label_values(&[route, result])
            .inc();
    }

    fn kernel_relay_family(&self, kind: RelayKind) -> &IntCounterVec {
        match kind {
            RelayKind::Postgres => &self.inner.kernel_relay,
            RelayKind::Redis => &self.inner.redis_kernel_relay,
            RelayKind::Mysql => &self.inner.mysql_kernel_relay,
        }
    }

    /// A route's pool series, resolved once (the pool keeps them with the
    /// route's idle list instead of looking labels up on every checkout).
    pub fn pg_pool_handles(&self, route: &str) -> PoolHandles {
        let event = |e: &str| self.inner.pool_events.with_label_values(&[route, e]);
        PoolHandles {
            hit: event("hit"),
            miss: event("miss"),
            returned: event("returned"),
            closed: event("closed"),
            reset_skipped: event("reset_skipped"),
            idle: self.inner.pool_idle.with_label_values(&[route]),
        }
    }

    pub fn pg_pool_idle(&self, route: &str, idle: usize) {
        self.inner
            .pool_idle
            .with_label_values(&[route])
            .set(i64::try_from(idle).unwrap_or(i64::MAX));
    }

    // ---- secrets -----------------------------------------------------------

    pub fn set_secret_counts(&self, secrets: usize, versions: u64) {
        self.inner
            .secrets
            .set(i64::try_from(secrets).unwrap_or(i64::MAX));
        self.inner
            .secret_versions
            .set(i64::try_from(versions).unwrap_or(i64::MAX));
    }

    /// Age of the current version of `route`'s secret (`None`: not stored,
    /// the series disappears) and its configured rotation period.
    pub fn set_secret_age(&self, route: &str, age: Option<f64>, period: Option<Duration>) {
        match age {
            Some(a) => self.inner.secret_age.with_label_values(&[route]).set(a),
            None => {
                let _ = self.inner.secret_age.remove_label_values(&[route]);
            }
        }
        if let Some(p) = period {
            self.inner
                .secret_rotation_period
                .with_label_values(&[route])
                .set(p.as_secs_f64());
        }
    }
}

/// Subsystem handles: the monitor (issue 5), anomaly detection (issue 6),
/// HTTP routes (issue 8), rotation and dynamic leases (issue 9) call these.
impl Metrics {
    pub fn monitor_event(&self, kind: MonitorEventKind, verdict: MonitorVerdict) {
        self.inner
            .monitor_events
            .with_label_values(&[kind.as_str(), verdict.as_str()])
            .inc();
    }

    pub fn monitor_events_lost(&self, n: u64) {
        self.inner.monitor_events_lost.inc_by(n);
    }

    pub fn monitor_kernel_hops(&self, n: u64) {
        self.inner.monitor_kernel_hops.inc_by(n);
    }

    pub fn monitor_events_dropped(&self) {
        self.inner.monitor_events_dropped.inc();
    }

    pub fn monitor_attributions(&self, source: &str, n: u64) {
        self.inner
            .monitor_attributions
            .with_label_values(&[source])
            .inc_by(n);
    }

    pub fn monitor_connect_denied(&self) {
        self.inner.monitor_connects_denied.inc();
    }

    pub fn monitor_bypass_attempt(&self) {
        self.inner.monitor_bypass_attempts.inc();
    }

    pub fn set_monitor_mode(&self, mode: MonitorMode) {
        for m in MonitorMode::ALL {
            self.inner
                .monitor_mode
                .with_label_values(&[m.as_str()])
                .set(i64::from(m == mode));
        }
    }

    pub fn monitor_mode(&self) -> MonitorMode {
        MonitorMode::ALL
            .into_iter()
            .find(|m| {
                self.inner
                    .monitor_mode
                    .with_label_values(&[m.as_str()])
                    .get()
                    == 1
            })
            .unwrap_or(MonitorMode::Off)
    }

    /// `rule` is an `[anomaly]` key, `action` one of [`ANOMALY_ACTIONS`].
    pub fn anomaly_detection(&self, rule: &str, action: &str) {
        self.inner
            .anomaly_detections
            .with_label_values(&[rule, action])
            .inc();
    }

    /// `result` one of [`ANOMALY_ALERT_RESULTS`].
    pub fn anomaly_alert(&self, result: &str) {
        self.inner.anomaly_alerts.with_label_values(&[result]).inc();
    }

    pub fn anomaly_signal_dropped(&self) {
        self.inner.anomaly_signals_dropped.inc();
    }

    /// The counters of export sink `sink`, resolved once (every series
    /// exists from the start at zero).
    pub(crate) fn export_counters(&self, sink: &str) -> crate::export::SinkCounters {
        let dropped = |reason: &str| self.inner.export_dropped.with_label_values(&[sink, reason]);
        crate::export::SinkCounters {
            sent: self.inner.export_sent.with_label_values(&[sink]),
            errors: self.inner.export_errors.with_label_values(&[sink]),
            queue_full: dropped("queue_full"),
            rate_limited: dropped("rate_limited"),
            failed: dropped("failed"),
        }
    }

    pub fn set_frozen_workloads(&self, n: usize) {
        self.inner
            .frozen_workloads
            .set(i64::try_from(n).unwrap_or(i64::MAX));
    }

    /// `result`: `success`, `failure` or `recovered` (a crashed rotation
    /// finished or rolled back at start-up).
    pub fn secret_rotation(&self, result: &str) {
        self.inner
            .secret_rotations
            .with_label_values(&[result])
            .inc();
    }

    pub fn lease_created(&self) {
        self.inner.leases_created.inc();
        self.inner.leases_active.inc();
    }

    pub fn lease_revoked(&self) {
        self.inner.leases_revoked.inc();
        self.inner.leases_active.dec();
    }

    /// Corrects the active-lease gauge (e.g. after loading leases at start-up).
    pub fn set_leases_active(&self, n: usize) {
        self.inner
            .leases_active
            .set(i64::try_from(n).unwrap_or(i64::MAX));
    }

    /// `route` is a configured route name, `result` a fixed label.
    pub fn http_request(&self, route: &str, result: &str) {
        self.inner
            .http_requests
            .with_label_values(&[route, result])
            .inc();
    }

    /// Pre-resolved per-route handles for the per-request hot path.
    pub fn http_route(&self, route: &str) -> HttpRouteMetrics {
        HttpRouteMetrics {
            forwarded: self
                .inner
                .http_requests
                .with_label_values(&[route, "forwarded"]),
            added: self.inner.http_added_seconds.with_label_values(&[route]),
        }
    }

    /// Latency warden added to one HTTP request on `route`.
    pub fn http_request_added(&self, route: &str, added: Duration) {
        self.inner
            .http_added_seconds
            .with_label_values(&[route])
            .observe(added.as_secs_f64());
    }
}

impl Metrics {
    /// Runs the scrape hooks, then encodes every family. Blocking: call it
    /// off the async runtime.
    pub fn render(&self) -> String {
        if let Ok(hooks) = self.inner.hooks.lock() {
            for h in hooks.iter() {
                h(self);
            }
        }
        let mut buf = Vec::new();
        let enc = TextEncoder::new();
        if enc.encode(&self.inner.registry.gather(), &mut buf).is_err() {
            return String::new();
        }
        String::from_utf8(buf).unwrap_or_default()
    }
}

/// Decrements its gauge when dropped.
pub struct GaugeGuard(IntGauge);

impl Drop for GaugeGuard {
    fn drop(&mut self) {
        self.0.dec();
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

async fn route(metrics: Metrics, req: Request<hyper::body::Incoming>) -> Response<Full<Bytes>> {
    if req.method() != hyper::Method::GET && req.method() != hyper::Method::HEAD {
        return respond(
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain",
            "only GET is supported\n".into(),
        );
    }
    match req.uri().path() {
        "/metrics" => {
            // Scrape hooks lock the service and the identity state: off the runtime.
            match tokio::task::spawn_blocking(move || metrics.render()).await {
                Ok(body) => respond(
                    StatusCode::OK,
                    "text/plain; version=0.0.4; charset=utf-8",
                    body,
                ),
                Err(e) => respond(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "text/plain",
                    format!("metrics could not be collected: {e}\n"),
                ),
            }
        }
        "/healthz" => respond(StatusCode::OK, "text/plain", "ok\n".into()),
        "/readyz" => {
            let (why, notes) = tokio::task::spawn_blocking(move || {
                (metrics.not_ready_reasons(), metrics.readiness_notes())
            })
            .await
            .unwrap_or_else(|e| (vec![format!("readiness checks failed: {e}")], Vec::new()));
            let mut body = String::new();
            let ready = why.is_empty();
            if ready {
                body.push_str("ready\n");
            }
            for w in why.into_iter().chain(notes) {
                body.push_str(&w);
                body.push('\n');
            }
            let code = if ready {
                StatusCode::OK
            } else {
                StatusCode::SERVICE_UNAVAILABLE
            };
            respond(code, "text/plain", body)
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
                let m = m.clone();
                async move { Ok::<_, std::convert::Infallible>(route(m, req).await) }
            });
            let io = hyper_util::rt::TokioIo::new(stream);
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(io, svc)
                .await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subsystem_families_are_exported_at_zero_and_move() {
        let m = Metrics::new().unwrap();
        let text = m.render();
        for line in [
            "warden_monitor_events_total{kind=\"connect\",verdict=\"bypass_denied\"} 0",
            "warden_monitor_events_total{kind=\"connect\",verdict=\"denied_frozen\"} 0",
            "warden_monitor_events_lost_total 0",
            "warden_monitor_kernel_hops_total 0",
            "warden_monitor_connects_denied_total 0",
            "warden_monitor_bypass_attempts_total 0",
            "warden_monitor_mode{mode=\"off\"} 1",
            "warden_monitor_mode{mode=\"ebpf\"} 0",
            "warden_anomaly_detections_total{action=\"freeze\",rule=\"distinct_secrets_per_minute\"} 0",
            "warden_frozen_workloads 0",
            "warden_secret_rotations_total{result=\"failure\"} 0",
            "warden_leases_active 0",
            "warden_leases_created_total 0",
            "warden_leases_revoked_total 0",
        ] {
            assert!(text.contains(line), "missing {line}:\n{text}");
        }
        m.monitor_event(MonitorEventKind::Connect, MonitorVerdict::BypassDenied);
        m.monitor_events_lost(3);
        m.monitor_connect_denied();
        m.monitor_bypass_attempt();
        m.set_monitor_mode(MonitorMode::Procfs);
        m.anomaly_detection("distinct_secrets_per_minute", "freeze");
        m.set_frozen_workloads(2);
        m.secret_rotation("failure");
        m.lease_created();
        m.lease_created();
        m.lease_revoked();
        m.http_request_added("api", Duration::from_micros(300));
        let text = m.render();
        for line in [
            "warden_monitor_events_total{kind=\"connect\",verdict=\"bypass_denied\"} 1",
            "warden_monitor_events_lost_total 3",
            "warden_monitor_mode{mode=\"procfs\"} 1",
            "warden_monitor_mode{mode=\"off\"} 0",
            "warden_frozen_workloads 2",
            "warden_secret_rotations_total{result=\"failure\"} 1",
            "warden_leases_active 1",
            "warden_leases_created_total 2",
            "warden_http_request_added_seconds_count{route=\"api\"} 1",
        ] {
            assert!(text.contains(line), "missing {line}:\n{text}");
        }
        assert_eq!(m.monitor_mode(), MonitorMode::Procfs);
        m.set_leases_active(0);
        assert!(m.render().contains("warden_leases_active 0"));
    }

    #[test]
    fn state_gauges_disappear_when_unknown_and_hooks_run_per_scrape() {
        let m = Metrics::new().unwrap();
        assert!(!m.render().contains("warden_ca_expiry_seconds "));
        let calls = Arc::new(std::sync::atomic::AtomicU32::new(0));
        let c = calls.clone();
        m.on_scrape(Box::new(move |m| {
            c.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            m.set_identity_expiry(Some(90.0), Some(86400.0));
        }));
        let text = m.render();
        assert!(
            text.contains("warden_svid_soonest_expiry_seconds 90"),
            "{text}"
        );
        assert!(text.contains("warden_ca_expiry_seconds 86400"), "{text}");
        m.render();
        assert_eq!(calls.load(std::sync::atomic::Ordering::SeqCst), 2);
        m.set_identity_expiry(None, None);
        m.set_secret_age("db", Some(5.0), Some(Duration::from_secs(60)));
        m.set_secret_age("db", None, None);
        let inner = &m.inner;
        assert!(inner
            .svid_soonest_expiry
            .get_metric_with_label_values(&[])
            .is_ok());
        inner.svid_soonest_expiry.reset();
        assert!(!m.render().contains("warden_secret_rotation_age_seconds{"));
    }

    #[test]
    fn readiness_lists_every_failing_check() {
        let m = Metrics::new().unwrap();
        assert!(m.not_ready_reasons().is_empty());
        m.set_sealed(true);
        m.readiness_check(Box::new(|_| Err("store: gone".into())));
        m.readiness_check(Box::new(|_| Ok(())));
        let why = m.not_ready_reasons();
        assert_eq!(why.len(), 2, "{why:?}");
        assert!(why[0].starts_with("sealed") && why[1] == "store: gone");
    }

    #[test]
    fn readiness_notes_do_not_decide_readiness() {
        let m = Metrics::new().unwrap();
        m.readiness_note(Box::new(|| {
            Some("audit copy in the store: up to date".into())
        }));
        m.readiness_note(Box::new(|| None));
        assert!(m.not_ready_reasons().is_empty());
        assert_eq!(
            m.readiness_notes(),
            vec!["audit copy in the store: up to date"]
        );
        // The ship error series exist from the start, at zero.
        assert!(m
            .render()
            .contains("warden_fleet_ship_errors_total{what=\"freeze_acks\"} 0"));
    }

    #[test]
    fn stream_guard_counts_open_streams() {
        let m = Metrics::new().unwrap();
        let a = m.workload_api_stream("FetchX509SVID");
        let b = m.workload_api_stream("FetchX509SVID");
        assert!(m
            .render()
            .contains("warden_workload_api_streams{op=\"FetchX509SVID\"} 2"));
        drop(a);
        drop(b);
        assert!(m
            .render()
            .contains("warden_workload_api_streams{op=\"FetchX509SVID\"} 0"));
    }
}

/// One PostgreSQL route's pool series ([`Metrics::pg_pool_handles`]).
#[derive(Clone)]
pub struct PoolHandles {
    pub hit: prometheus::IntCounter,
    pub miss: prometheus::IntCounter,
    pub returned: prometheus::IntCounter,
    pub closed: prometheus::IntCounter,
    pub reset_skipped: prometheus::IntCounter,
    pub idle: prometheus::IntGauge,
}

impl PoolHandles {
    pub fn set_idle(&self, n: usize) {
        self.idle.set(i64::try_from(n).unwrap_or(i64::MAX));
    }
}
