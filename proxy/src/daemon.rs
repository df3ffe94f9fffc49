//! `warden up`: the long-running daemon.
//!
//! Start-up order: private umask → capabilities checked and dropped, not
//! dumpable, descriptor limit raised (`privileges`) → data dir checks and
//! lock → store, audit log and master key (sealed if the KEK is split into shares) → admin socket and
//! metrics endpoint bound → `daemon.start` audit record → `READY=1` to systemd.
//! SIGTERM/SIGINT stop it cleanly: `daemon.stop` is recorded and the socket
//! removed.

use crate::access_monitor::AccessMonitor;
use crate::admin::{self, AdminAccess};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use warden_core::admission::{Admission, AdmissionParts};
use warden_core::authority::IdentityHandle;
use warden_core::config::Config;
use warden_core::error::{Error, Result};
use warden_core::metrics::{self, Metrics};
use warden_core::paths;
use warden_core::service::{SecretService, StorePolicy};
use warden_http as http;
use warden_mysql as mysql;
use warden_postgres as pg;
use warden_redis as redis;
use warden_tls as tlsroute;
use warden_workload_api as workload_api;
use warden_workload_api::provider::WorkloadIdentityProvider;

pub fn admin_socket_path(cfg: &Config, data_dir: &Path) -> PathBuf {
    cfg.admin
        .socket
        .clone()
        .unwrap_or_else(|| paths::default_admin_socket(data_dir))
}

/// The Workload API socket: as configured, else `workload.sock` beside the
/// admin socket.
pub fn workload_socket_path(cfg: &Config, data_dir: &Path) -> PathBuf {
    cfg.identity
        .workload_api_socket
        .clone()
        .unwrap_or_else(|| admin_socket_path(cfg, data_dir).with_file_name("workload.sock"))
}

/// Binds the Workload API socket: mode 0666, since any local process may ask
/// (attestation, not file permissions, decides what it gets).
fn bind_workload_socket(path: &Path) -> Result<tokio::net::UnixListener> {
    use std::os::unix::fs::PermissionsExt;
    if let Some(parent) = path.parent() {
        if !parent.exists() {
            std::fs::create_dir_all(parent)
                .map_err(|e| Error::io("cannot create Workload API socket dir", parent, &e))?;
            std::fs::set_permissions(parent, std::fs::Permissions::from_mode(0o755))
                .map_err(|e| Error::io("cannot chmod", parent, &e))?;
        }
    }
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(Error::unavailable(format!(
                "Workload API socket {} is in use by another process",
                path.display()
            )));
        }
        std::fs::remove_file(path)
            .map_err(|e| Error::io("cannot remove stale socket", path, &e))?;
    }
    let l = tokio::net::UnixListener::bind(path)
        .map_err(|e| Error::io("cannot bind Workload API socket", path, &e))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o666))
        .map_err(|e| Error::io("cannot chmod Workload API socket", path, &e))?;
    Ok(l)
}

pub fn run(cfg: &Config, data_dir: &Path) -> Result<()> {
    // Everything the daemon creates (socket, audit files) is private by default.
    rustix::process::umask(rustix::fs::Mode::from_raw_mode(0o077));
    // First, while this is the only thread: capabilities checked and dropped
    // (the eBPF loader thread keeps its own until it is done), no core dumps,
    // the descriptor limit raised.
    let mut hardening = crate::privileges::Hardening::begin(cfg)?;
    paths::check_private_dir(data_dir)?;
    let _lock = paths::lock_data_dir(data_dir)?;
    let mut service = SecretService::open(data_dir, StorePolicy::from_config(cfg), true)?;
    // On a fleet store: this node's record (a removed node does not start).
    if let Some(node) = service.fleet_register()? {
        tracing::info!(node = %node.id, name = %node.name, "fleet node");
    }
    let metrics = Metrics::new().map_err(|e| Error::internal(format!("metrics registry: {e}")))?;
    service.set_metrics(metrics.clone());

    let group = match &cfg.admin.group {
        Some(g) => Some((
            g.clone(),
            paths::group_gid(g).ok_or_else(|| {
                Error::usage(format!(
                    "admin.group: group {g:?} does not exist; fix: create it (groupadd {g}) or remove the key"
                ))
            })?,
        )),
        None => None,
    };
    let admin_access = AdminAccess {
        daemon_uid: paths::euid(),
        group,
    };
    let socket = admin_socket_path(cfg, data_dir);
    let identity = Arc::new(IdentityHandle::new(cfg)?);

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(runtime_workers())
        .enable_all()
        .build()
        .map_err(|e| Error::internal(format!("cannot start the async runtime: {e}")))?;
    let result = runtime.block_on(async {
        let mut signals = ShutdownSignals::install()?;
        let admin_listener = admin::bind_socket(&socket, &admin_access)?;
        let workload_socket = workload_socket_path(cfg, data_dir);
        let workload_listener = bind_workload_socket(&workload_socket)?;
        // PostgreSQL, MySQL and Redis sessions run on `session_threads`
        // single-threaded runtimes, each with its own SO_REUSEPORT listener
        // of every such route (see `warden_core::shard`).
        let shards = warden_core::shard::Shards::start(cfg.session_threads())?;
        let pg_listeners = pg::bind_routes(pg::PgRoute::from_config(cfg)?, shards.len()).await?;
        let http_listeners = http::bind_routes(http::HttpRoute::from_config(cfg)?).await?;
        let tls_listeners = tlsroute::bind_routes(tlsroute::TlsRoute::from_config(cfg)?).await?;
        let redis_listeners = redis::bind_routes(redis::RedisRoute::from_config(cfg)?, shards.len()).await?;
        let mysql_listeners = mysql::bind_routes(mysql::MysqlRoute::from_config(cfg)?, shards.len()).await?;
        // Every bound listener is watched by the monitor (attribution, events).
        let mut bound: Vec<(std::net::SocketAddr, String)> = pg_listeners
            .iter()
            .map(|b| (b.local_addr(), b.route.name.clone()))
            .collect();
        bound.extend(http_listeners.iter().map(|l| {
            let (name, listen) = l.describe();
            (listen, name)
        }));
        bound.extend(
            tls_listeners
                .iter()
                .map(|(r, tcp)| (tcp.local_addr().unwrap_or(r.listen), r.name.clone())),
        );
        // (A route's shard listeners share one address.)
        let first_addr = |r: &std::net::SocketAddr, tcp: &[std::net::TcpListener]| {
            tcp.first().and_then(|l| l.local_addr().ok()).unwrap_or(*r)
        };
        bound.extend(redis_listeners.iter().map(|(r, tcp)| (first_addr(&r.listen, tcp), r.name.clone())));
        bound.extend(mysql_listeners.iter().map(|(r, tcp)| (first_addr(&r.listen, tcp), r.name.clone())));
        // One executable-hash cache for the daemon: attestation, freezes and
        // the event feed hash a process's executable once.
        let hashes = Arc::new(warden_identity::attest::ExeHashCache::new());
        // `[export]`: a queue and a thread per sink; audit records go out
        // as the log writes them (from the daemon's first record on), events
        // from the monitor's enricher. Neither ever waits for a sink.
        let exporter = warden_core::export::Exporter::start(&cfg.export, &metrics)?;
        if let Some(x) = exporter.as_ref().filter(|x| x.wants_audit()) {
            service.auditor().set_tap(x.audit_tap())?;
        }
        let access = AccessMonitor::start(
            cfg,
            data_dir,
            bound,
            &metrics,
            hashes.clone(),
            exporter.clone(),
            &mut hardening,
        )
        .await?;
        let metrics_listener = match cfg.metrics.listen {
            Some(addr) => Some(metrics::bind(addr).await.map_err(|e| {
                Error::usage(format!(
                    "metrics.listen: cannot listen on {addr}: {e}; fix: choose a free address or set listen = \"off\""
                ))
            })?),
            None => None,
        };
        let sealed = service.is_sealed();
        let seal = service.seal_config().clone();
        service.record_daemon(
            "daemon.start",
            format!(
                "pid {}, kek source {}, {}, monitor {}",
                std::process::id(),
                seal.source,
                if sealed { "sealed" } else { "unsealed" },
                access.mode.as_str()
            ),
        )?;
        // One credential cache for the daemon; every change of a secret
        // empties its entry before it is acknowledged.
        let credentials = Arc::new(warden_core::credentials::CredentialCache::default());
        service.set_credential_cache(credentials.clone());
        let service = Arc::new(Mutex::new(service));
        // A shared store's reachability, fed by its connections (see
        // `warden_core::store::health`): /readyz, metrics, stale serving.
        let store_health = match cfg.store.backend {
            warden_core::config::StoreBackend::Postgres => Some(warden_core::store::health::StoreHealth::of(
                &warden_core::store::postgres::PostgresSettings::from_config(&cfg.store)?.describe(),
            )),
            warden_core::config::StoreBackend::Sqlite => None,
        };
        crate::observe::install(&metrics, cfg, service.clone(), identity.clone(), store_health.clone());
        // Load (or create) the CA now when unsealed, so a bad trust domain stops the start.
        {
            let svc = service.clone();
            let ident = identity.clone();
            tokio::task::spawn_blocking(move || -> Result<()> {
                let mut s = svc.lock().map_err(|_| Error::internal("service state poisoned"))?;
                s.maintain_identity(&ident).map(|_| ())
            })
            .await
            .map_err(|e| Error::internal(format!("identity start-up failed: {e}")))??;
        }

        // Dynamic leases and rotation: orphans revoked and interrupted
        // rotations resolved before clients are served (see `credentials_start`).
        let leases = Arc::new(pg::dynamic::LeaseManager::new(
            pg::dynamic_specs(cfg)?
                .into_iter()
                .chain(mysql::dynamic::dynamic_specs(cfg)?)
                .chain(redis::dynamic::dynamic_specs(cfg)?)
                .collect(),
            service.clone(),
            credentials.clone(),
            Some(metrics.clone()),
        )
        .with_store_health(store_health.clone()));
        let rotator = Arc::new(
            warden_core::rotation::Rotator::new(
                cfg,
                service.clone(),
                credentials.clone(),
                Some(metrics.clone()),
            )?
            .with_changer("mysql", Arc::new(mysql::rotate::MysqlRotation::from_config(cfg)?))
            .with_changer("redis", Arc::new(redis::rotate::RedisRotation::from_config(cfg)?)),
        );
        if !sealed {
            credentials_start(&leases, &rotator).await;
        }

        tracing::info!(socket = %socket.display(), "admin API listening");
        if let Some(l) = &metrics_listener {
            if let Ok(a) = l.local_addr() {
                tracing::info!("metrics on http://{a}/metrics");
            }
        }
        match cfg.audit.sync_window() {
            Some(w) => tracing::info!(
                "audit.sync = \"interval\": each session's audit record is written to the OS before the session goes on and fsynced up to {} later; a crash of warden loses none, an OS crash or power loss can lose the newest (set audit.sync = \"commit\" to fsync each one first)",
                warden_core::config::format_duration(w)
            ),
            None => tracing::info!("audit.sync = \"commit\": each session's audit record is fsynced before the session goes on"),
        }
        if sealed {
            let t = seal.shamir.as_ref().map(|s| s.threshold).unwrap_or(0);
            tracing::warn!("sealed: run `warden unseal` with {t} shares before secrets can be served");
        }
        notify_systemd(&format!(
            "READY=1\nSTATUS={}",
            if sealed { "sealed: waiting for unseal shares" } else { "serving" }
        ));

        // Frozen workloads (persisted) back into the kernel maps, then the detector.
        let freezer = Arc::new(warden_core::freeze::Freezer::new(
            cfg,
            service.clone(),
            identity.clone(),
            access.kernel().cloned(),
            metrics.clone(),
            hashes.clone(),
        )?);
        {
            let f = freezer.clone();
            tokio::task::spawn_blocking(move || f.reapply())
                .await
                .map_err(|e| Error::internal(format!("re-applying freezes failed: {e}")))?;
        }
        let freeze_task = tokio::spawn(freezer.clone().run());
        // On a fleet store, changes committed on other nodes apply here as
        // they commit (see `warden_core::propagation`).
        let lease_requests = Arc::new(tokio::sync::Notify::new());
        let _fleet_listener = match cfg.store.backend {
            warden_core::config::StoreBackend::Postgres => Some(warden_core::propagation::ChangeListener::start(
                warden_core::store::postgres::PostgresSettings::from_config(&cfg.store)?,
                warden_core::propagation::FleetCaches {
                    credentials: credentials.clone(),
                    freezer: freezer.clone(),
                    identity: identity.clone(),
                    own_node_key: Some(format!(
                        "{}{}",
                        warden_core::fleet::NODE_PREFIX,
                        warden_core::fleet::node_id(&warden_core::store::postgres::node_name(data_dir))
                    )),
                    lease_requests: lease_requests.clone(),
                },
            )?),
            warden_core::config::StoreBackend::Sqlite => None,
        };
        // On a fleet store, this node's audit records, access events and
        // applied freezes are copied to the store (see
        // `warden_core::fleet_views`): its own connection and thread, never
        // in the way of a session.
        let _shipper = match cfg.store.backend {
            warden_core::config::StoreBackend::Postgres => {
                let events: Arc<dyn warden_core::fleet_views::EventSource> = access.feed.clone();
                let shipper = warden_core::fleet_views::Shipper::start(warden_core::fleet_views::ShipperParts {
                    store: cfg.store.clone(),
                    node: warden_core::store::postgres::node_name(data_dir),
                    audit_log: data_dir.join(paths::AUDIT_FILE),
                    events: Some(events),
                    freezer: Some(freezer.clone()),
                    metrics: Some(metrics.clone()),
                })?;
                let status = shipper.status();
                if let Ok(mut s) = service.lock() {
                    s.set_ship_status(status.clone());
                }
                metrics.readiness_note(Box::new(move || {
                    Some(format!("audit copy in the store: {}", status.report().describe()))
                }));
                Some(shipper)
            }
            warden_core::config::StoreBackend::Sqlite => None,
        };
        let anomaly = warden_core::anomaly::Anomaly::start(cfg, freezer.clone(), service.clone(), metrics.clone());
        access.set_anomaly(anomaly.clone());

        let admin_task = tokio::spawn(admin::serve(
            admin_listener,
            service.clone(),
            identity.clone(),
            metrics.clone(),
            admin_access.clone(),
            admin::Engines {
                rotator: rotator.clone(),
                leases: leases.clone(),
                events: access.feed.clone(),
                freezer: Some(freezer.clone()),
            },
        ));
        let identity_task = tokio::spawn(maintain_identity(service.clone(), identity.clone()));
        // The admission step every front end shares: one attestor (one
        // executable-hash cache), the freezer, the anomaly detector, the
        // credential cache and one session audit writer.
        let admission = Admission::new(AdmissionParts {
            attestor: warden_core::peer::Attestor::from_config(cfg, access.resolver(), hashes.clone()),
            freezer: freezer.clone(),
            anomaly: anomaly.clone(),
            credentials: credentials.clone(),
            service: service.clone(),
            audit: warden_core::journal::Journal::start(
                service.clone(),
                "warden-audit",
                cfg.audit.sync_window(),
            )?,
            metrics: metrics.clone(),
            stale: store_health.map(|health| warden_core::admission::StalePolicy {
                health,
                stale_if_error: cfg.store.stale_if_error,
                rotation_periods: cfg
                    .secrets
                    .iter()
                    .filter_map(|s| s.rotation_period.map(|p| (s.name.clone(), p)))
                    .collect(),
            }),
        });
        let provider = Arc::new(WorkloadIdentityProvider::new(
            admission.clone(),
            identity.clone(),
            metrics.clone(),
        ));
        // Asked once: an unavailable relay is logged once.
        let kernel_relay = access.kernel_relay();
        let pg_routes: Vec<_> = pg_listeners.iter().map(|b| b.route.clone()).collect();
        let pg_shared = Arc::new(pg::PgShared::new(
            admission.clone(),
            &pg_routes,
            identity.clone(),
            metrics.clone(),
            pg::SessionServices {
                leases: leases.clone(),
                kernel_relay: kernel_relay.clone(),
            },
        )?);
        let credentials_task = tokio::spawn(maintain_credentials(
            leases.clone(),
            rotator.clone(),
            pg_shared.clone(),
            service.clone(),
            !sealed,
            (cfg.store.backend == warden_core::config::StoreBackend::Postgres).then_some(lease_requests),
        ));
        let mut route_tasks = Vec::new();
        let mut shard_tasks = Vec::new();
        for bound in pg_listeners {
            tracing::info!(route = %bound.route.name, listen = %bound.route.listen, shards = shards.len(), "PostgreSQL route listening");
            let mut unix = bound.unix;
            for (i, tcp) in bound.tcp.into_iter().enumerate() {
                let task = pg::serve_shard(bound.route.clone(), i, tcp, unix.take(), pg_shared.clone());
                shard_tasks.push(shards.handle(i).spawn(task));
            }
        }
        let http_shared = Arc::new(http::HttpShared::new(admission.clone(), metrics.clone()));
        for l in http_listeners {
            let (name, listen) = l.describe();
            tracing::info!(route = %name, listen = %listen, "HTTP route listening");
            route_tasks.push(tokio::spawn(http::serve(l, http_shared.clone())));
        }
        let tls_shared = Arc::new(tlsroute::TlsShared::new(
            admission.clone(),
            identity.clone(),
            metrics.clone(),
        ));
        for (route, tcp) in tls_listeners {
            tracing::info!(route = %route.name, listen = %route.listen, "TLS origination route listening");
            route_tasks.push(tokio::spawn(tlsroute::serve_route(route, tcp, tls_shared.clone())));
        }
        let redis_routes: Vec<_> = redis_listeners.iter().map(|(r, _)| r.clone()).collect();
        let redis_shared = Arc::new(redis::RedisShared::new(
            admission.clone(),
            metrics.clone(),
            &redis_routes,
            identity.clone(),
        )?
        .with_leases(leases.clone())
        .with_kernel_relay(kernel_relay.clone(), &redis_routes));
        for (route, tcp) in redis_listeners {
            tracing::info!(route = %route.name, listen = %route.listen, shards = shards.len(), "Redis route listening");
            for (i, tcp) in tcp.into_iter().enumerate() {
                let task = redis::serve_route(route.clone(), i, tcp, redis_shared.clone());
                shard_tasks.push(shards.handle(i).spawn(task));
            }
        }
        let mysql_routes: Vec<_> = mysql_listeners.iter().map(|(r, _)| r.clone()).collect();
        let mysql_shared = Arc::new(
            mysql::MysqlShared::new(admission.clone(), metrics.clone(), &mysql_routes, identity.clone())?
                .with_leases(leases.clone())
                .with_kernel_relay(kernel_relay),
        );
        for (route, tcp) in mysql_listeners {
            tracing::info!(route = %route.name, listen = %route.listen, shards = shards.len(), "MySQL route listening");
            for (i, tcp) in tcp.into_iter().enumerate() {
                let task = mysql::serve_route(route.clone(), i, tcp, mysql_shared.clone());
                shard_tasks.push(shards.handle(i).spawn(task));
            }
        }
        let (stop_workload_api, workload_api_stopped) = tokio::sync::oneshot::channel::<()>();
        let workload_task = tokio::spawn(workload_api::serve(workload_listener, provider, async move {
            let _ = workload_api_stopped.await;
        }));
        tracing::info!(socket = %workload_socket.display(), "SPIFFE Workload API listening (SPIFFE_ENDPOINT_SOCKET=unix:{})", workload_socket.display());
        let metrics_task = metrics_listener.map(|l| tokio::spawn(metrics::serve(l, metrics.clone())));

        // A node removed from the fleet stops as if told to (see
        // `warden_core::fleet`); it exits with the removal's error.
        let signal = tokio::select! {
            s = signals.wait() => s,
            _ = identity.removed() => "removal from the fleet",
        };
        tracing::info!("{signal} received: shutting down");
        notify_systemd("STOPPING=1");
        admin_task.abort();
        identity_task.abort();
        credentials_task.abort();
        freeze_task.abort();
        for t in &route_tasks {
            t.abort();
        }
        for t in &shard_tasks {
            t.abort();
        }
        let _ = stop_workload_api.send(());
        if tokio::time::timeout(std::time::Duration::from_secs(2), workload_task).await.is_err() {
            tracing::warn!("Workload API connections did not close within 2 s");
        }
        let _ = std::fs::remove_file(&workload_socket);
        if let Some(t) = metrics_task {
            t.abort();
        }
        let _ = std::fs::remove_file(&socket);
        if !leases.is_empty() {
            let scram = pg::scram::ScramKeyCache::with_capacity(16);
            let revoke = leases.revoke_all(&scram, "warden is stopping");
            if tokio::time::timeout(std::time::Duration::from_secs(5), revoke).await.is_err() {
                tracing::warn!("leases not revoked within 5 s; the next start revokes them");
            }
        }
        // Open sessions end with their shard runtimes.
        tokio::task::block_in_place(|| shards.stop());
        access.shutdown();
        let svc = service.clone();
        let sessions = admission.clone();
        tokio::task::spawn_blocking(move || {
            // Session-end records held for the next write go before the
            // stop record.
            if let Err(e) = sessions.audit().flush_held() {
                tracing::error!("{}", e.message);
            }
            match svc.lock() {
                Ok(mut s) => s.record_daemon("daemon.stop", format!("{signal} received")),
                Err(_) => Err(Error::internal("service state poisoned")),
            }
        })
        .await
        .map_err(|e| Error::internal(format!("shutdown task failed: {e}")))??;
        // The last records (daemon.stop) reach the sinks if they can within 2 s.
        if let Some(x) = &exporter {
            let x = x.clone();
            let _ = tokio::task::spawn_blocking(move || x.flush(std::time::Duration::from_secs(2))).await;
        }
        if identity.is_removed() {
            return Err(Error::denied(
                "this node was removed from the fleet (`warden node remove`): it stopped serving; fix: to bring it back run `warden node token` on a fleet node, then `warden node join` here",
            ));
        }
        Ok(())
    });
    runtime.shutdown_timeout(std::time::Duration::from_secs(2));
    result
}

/// Runtime worker threads: one per core, at least 2 (a blocking step on one
/// never stalls every session) and at most 8 (warden shares its node with the
/// workloads it serves; blocking work has its own pool).
fn runtime_workers() -> usize {
    std::thread::available_parallelism().map_or(2, |n| n.get().clamp(2, 8))
}

/// Start-up work for credentials once the store is unsealed: revoke leases a
/// previous process left (no orphans), finish or roll back interrupted rotations.
async fn credentials_start(
    leases: &pg::dynamic::LeaseManager,
    rotator: &warden_core::rotation::Rotator,
) {
    let scram = pg::scram::ScramKeyCache::with_capacity(16);
    if !leases.is_empty() {
        match leases.revoke_orphans(&scram).await {
            Ok(0) => {}
            Ok(n) => tracing::warn!("revoked {n} lease(s) left by a previous warden process"),
            Err(e) => tracing::error!("orphaned leases not revoked yet (retrying): {}", e.message),
        }
    }
    if !rotator.is_empty() {
        let n = rotator.recover_all().await;
        if n > 0 {
            tracing::warn!("resolved {n} interrupted rotation(s)");
        }
    }
}

/// Renews and revokes leases, rotates secrets when their period is up.
async fn maintain_credentials(
    leases: Arc<pg::dynamic::LeaseManager>,
    rotator: Arc<warden_core::rotation::Rotator>,
    shared: Arc<pg::PgShared>,
    service: Arc<Mutex<SecretService>>,
    mut started: bool,
    lease_requests: Option<Arc<tokio::sync::Notify>>,
) {
    let mut ticks: u64 = 0;
    loop {
        // On a fleet store another node's `lease revoke` wakes this loop.
        let woken = match &lease_requests {
            Some(n) => tokio::select! {
                _ = tokio::time::sleep(std::time::Duration::from_secs(1)) => false,
                _ = n.notified() => true,
            },
            None => {
                tokio::time::sleep(std::time::Duration::from_secs(1)).await;
                false
            }
        };
        let sealed = service.lock().map(|s| s.is_sealed()).unwrap_or(true);
        if sealed {
            continue;
        }
        if !started {
            credentials_start(&leases, &rotator).await;
            started = true;
        }
        if lease_requests.is_some() && !leases.is_empty() && (woken || ticks.is_multiple_of(10)) {
            leases.revoke_requested(&shared.scram_cache).await;
        }
        if woken {
            continue;
        }
        ticks += 1;
        leases.maintain(&shared.scram_cache).await;
        if ticks.is_multiple_of(30) {
            // Orphan rows whose revocation failed earlier are retried.
            let _ = leases.revoke_orphans(&shared.scram_cache).await;
        }
        if ticks.is_multiple_of(5) {
            rotator.tick().await;
        }
    }
}

/// Loads the CA once the store is unsealed and keeps CAs and SVIDs rotated.
async fn maintain_identity(service: Arc<Mutex<SecretService>>, identity: Arc<IdentityHandle>) {
    loop {
        let (svc, ident) = (service.clone(), identity.clone());
        let wait = tokio::task::spawn_blocking(move || match svc.lock() {
            Ok(mut s) => s.maintain_identity(&ident),
            Err(_) => Err(Error::internal("service state poisoned")),
        })
        .await;
        let wait = match wait {
            Ok(Ok(d)) => d,
            Ok(Err(e)) => {
                tracing::error!(
                    "identity maintenance failed: {}; retrying in 5 s",
                    e.message
                );
                std::time::Duration::from_secs(5)
            }
            Err(e) => {
                tracing::error!("identity maintenance task failed: {e}");
                std::time::Duration::from_secs(5)
            }
        };
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = identity.wake.notified() => {}
        }
    }
}

/// SIGTERM and SIGINT handlers, installed before the daemon reports ready so
/// a signal that follows READY=1 always takes the clean shutdown path.
struct ShutdownSignals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
}

impl ShutdownSignals {
    fn install() -> Result<ShutdownSignals> {
        use tokio::signal::unix::{signal, SignalKind};
        let term = signal(SignalKind::terminate())
            .map_err(|e| Error::internal(format!("cannot handle SIGTERM: {e}")))?;
        let int = signal(SignalKind::interrupt())
            .map_err(|e| Error::internal(format!("cannot handle SIGINT: {e}")))?;
        Ok(ShutdownSignals { term, int })
    }

    async fn wait(&mut self) -> &'static str {
        tokio::select! {
            _ = self.term.recv() => "SIGTERM",
            _ = self.int.recv() => "SIGINT",
        }
    }
}

/// Sends a state string to systemd when run as a `Type=notify` service.
fn notify_systemd(state: &str) {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let Ok(sock) = std::os::unix::net::UnixDatagram::unbound() else {
        return;
    };
    let bytes = path.as_encoded_bytes();
    let res = if let Some(name) = bytes.strip_prefix(b"@") {
        use std::os::linux::net::SocketAddrExt;
        std::os::unix::net::SocketAddr::from_abstract_name(name)
            .and_then(|a| sock.send_to_addr(state.as_bytes(), &a))
    } else {
        sock.send_to(state.as_bytes(), PathBuf::from(&path))
    };
    if let Err(e) = res {
        tracing::warn!("sd_notify failed: {e}");
    }
}
