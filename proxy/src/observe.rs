//! The daemon's observability wiring: scrape-time refresh of the gauges that
//! describe state (identity expiry, secret inventory and ages), the `/readyz`
//! conditions beyond "unsealed" (store open, monitor in its configured mode),
//! and the series of configured routes exported at zero.
//!
//! Only metadata is read here: never a secret value, and nothing is audited
//! (a scrape is not an access).

use std::sync::{Arc, Mutex};
use std::time::Duration;
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;
use warden_core::authority::IdentityHandle;
use warden_core::config::{Config, EbpfMode};
use warden_core::metrics::{Metrics, MonitorMode};
use warden_core::service::SecretService;
use warden_core::store::health::StoreHealth;

/// A route and the stored secret it uses.
struct RouteSecret {
    route: String,
    secret: String,
    env: String,
    rotation_period: Option<Duration>,
}

pub fn install(
    metrics: &Metrics,
    cfg: &Config,
    service: Arc<Mutex<SecretService>>,
    identity: Arc<IdentityHandle>,
    store_health: Option<Arc<StoreHealth>>,
) {
    metrics.set_svid_ttl(cfg.identity.svid_ttl);
    for r in &cfg.routes {
        metrics.declare_route(
            &r.name,
            r.kind == warden_core::config::RouteKind::Http,
            &r.allow,
        );
    }

    metrics.on_scrape(Box::new(move |m| {
        let now = OffsetDateTime::now_utc();
        let (svid, ca) = match identity.authority.lock() {
            Ok(g) => g.as_ref().map(|a| a.expiries()).unwrap_or((None, None)),
            Err(_) => (None, None),
        };
        let secs = |t: Option<OffsetDateTime>| t.map(|t| (t - now).as_seconds_f64());
        m.set_identity_expiry(secs(svid), secs(ca));
    }));

    let routes: Vec<RouteSecret> = cfg
        .routes
        .iter()
        .filter_map(|r| {
            let secret = r
                .credential
                .as_ref()
                .map(|c| c.secret.clone())
                .or_else(|| r.inject.as_ref().map(|i| i.secret.clone()))?;
            let rotation_period = cfg
                .secrets
                .iter()
                .find(|s| s.name == secret)
                .and_then(|s| s.rotation_period);
            Some(RouteSecret {
                route: r.name.clone(),
                secret,
                env: cfg.environment.clone(),
                rotation_period,
            })
        })
        .collect();
    let svc = service.clone();
    let health = store_health.clone();
    metrics.on_scrape(Box::new(move |m| {
        // A store known to be unreachable: keep the last values rather than
        // wait for a connection attempt under the service lock.
        if health.as_ref().is_some_and(|h| h.outage().is_some()) {
            return;
        }
        let Ok(s) = svc.lock() else { return };
        let Ok(list) = s.inventory() else { return };
        let created: Vec<Option<String>> = routes
            .iter()
            .map(|r| {
                s.current_version_created_at(&r.secret, &r.env)
                    .ok()
                    .flatten()
            })
            .collect();
        drop(s);
        let versions = list.iter().map(|s| u64::from(s.versions_kept)).sum();
        m.set_secret_counts(list.len(), versions);
        let now = OffsetDateTime::now_utc();
        for (r, created) in routes.iter().zip(created) {
            let age = created
                .and_then(|t| OffsetDateTime::parse(&t, &Rfc3339).ok())
                .map(|t| (now - t).as_seconds_f64().max(0.0));
            m.set_secret_age(&r.route, age, r.rotation_period);
        }
    }));

    // The SQLite store is a local file: always "reachable" (its failures
    // are I/O errors, reported as such).
    metrics.set_store_unreachable(None);
    if let Some(health) = store_health.clone() {
        metrics.on_scrape(Box::new(move |m| {
            m.set_store_unreachable(health.outage().map(|o| o.lasted()));
        }));
    }

    metrics.readiness_check(Box::new(move |_| {
        // A known outage: say so without waiting for another connection
        // attempt (the listener notices the store's return).
        if let Some(o) = store_health.as_ref().and_then(|h| h.outage()) {
            return Err(store_unreachable_reason(
                store_health.as_ref().map_or("", |h| h.at()),
                &o,
            ));
        }
        let s = service
            .lock()
            .map_err(|_| "store: the service state is poisoned".to_string())?;
        if let Some(why) = s.audit_sync_failure() {
            return Err(format!(
                "audit: a background fsync of the audit log failed ({why}); every audited action is refused until warden is restarted"
            ));
        }
        s.inventory()
            .map(|_| ())
            .map_err(|e| format!("store: {}", e.message))
    }));

    let wanted = cfg.monitor.ebpf;
    metrics.readiness_check(Box::new(move |m| monitor_ready(wanted, m.monitor_mode())));
}

/// The `/readyz` reason of a store outage: what works, what does not.
fn store_unreachable_reason(at: &str, o: &warden_core::store::health::Outage) -> String {
    format!(
        "store: the {at} is unreachable {}: {}; writes (secret put/rm/rotate, freeze, lease revoke) fail and sessions are served only from cached credentials (store.stale_if_error) until it is back",
        o.describe_since(),
        o.error
    )
}

/// `monitor.ebpf = "required"` is ready only in eBPF mode; `auto` accepts
/// the procfs fallback (an alert reports it) and `off` needs nothing.
fn monitor_ready(wanted: EbpfMode, mode: MonitorMode) -> Result<(), String> {
    match wanted {
        EbpfMode::Required if mode != MonitorMode::Ebpf => Err(format!(
            "monitor: monitor.ebpf = \"required\" but the monitor runs in mode {}",
            mode.as_str()
        )),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn required_ebpf_is_ready_only_in_ebpf_mode() {
        assert!(monitor_ready(EbpfMode::Required, MonitorMode::Ebpf).is_ok());
        let e = monitor_ready(EbpfMode::Required, MonitorMode::Procfs).unwrap_err();
        assert!(e.contains("monitor.ebpf") && e.contains("procfs"), "{e}");
        assert!(monitor_ready(EbpfMode::Auto, MonitorMode::Procfs).is_ok());
        assert!(monitor_ready(EbpfMode::Off, MonitorMode::Off).is_ok());
    }
}
