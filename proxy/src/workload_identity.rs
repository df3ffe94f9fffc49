//! The daemon's side of the SPIFFE Workload API: who is calling (attestation
//! of the socket peer), and what they get (their SVIDs, the bundle, JWTs).
//!
//! Data path per request: SO_PEERCRED pid → facts from /proc (exe hashed via
//! /proc/PID/exe) → the one matching `[[workload]]` registration → pid-reuse
//! check → the authority's SVID for that workload. Every refusal and every
//! newly issued SVID is an audit record; refusals are counted in metrics.

use crate::audit::{Actor, ActorKind, Decision, Event, Target};
use crate::authority::IdentityHandle;
use crate::metrics::{AttestVia, GaugeGuard, Metrics};
use crate::service::SecretService;
use crate::workload_api::{
    CallerCred, IdentityError, IdentityProvider, X509BundleEntry, X509SvidMaterial,
};
use std::sync::{Arc, Mutex};
use warden_identity::attest::{self, ExeHashCache, PeerFacts, Registration};

pub struct WorkloadIdentityProvider {
    service: Arc<Mutex<SecretService>>,
    identity: Arc<IdentityHandle>,
    registrations: Vec<Registration>,
    hashes: ExeHashCache,
    metrics: Metrics,
    freezer: Option<Arc<crate::freeze::Freezer>>,
    anomaly: Option<Arc<crate::anomaly::Anomaly>>,
}

/// Who a caller was attested to be.
struct Attested {
    facts: PeerFacts,
    workload: String,
    spiffe_id: String,
}

impl WorkloadIdentityProvider {
    pub fn new(
        cfg: &crate::config::Config,
        service: Arc<Mutex<SecretService>>,
        identity: Arc<IdentityHandle>,
        metrics: Metrics,
    ) -> Self {
        WorkloadIdentityProvider {
            service,
            identity,
            registrations: cfg.workloads.iter().map(|w| w.registration()).collect(),
            hashes: ExeHashCache::new(),
            metrics,
            freezer: None,
            anomaly: None,
        }
    }

    /// Frozen workloads get no SVIDs; issuance feeds the anomaly detector.
    pub fn with_anomaly(
        mut self,
        freezer: Arc<crate::freeze::Freezer>,
        anomaly: Arc<crate::anomaly::Anomaly>,
    ) -> Self {
        self.freezer = Some(freezer);
        self.anomaly = Some(anomaly);
        self
    }

    fn audit(
        &self,
        actor: Actor,
        action: &str,
        decision: Decision,
        detail: String,
        reason: String,
    ) {
        if let Ok(mut s) = self.service.lock() {
            let _ = s.record(&Event {
                actor,
                action: action.into(),
                target: Target {
                    detail: Some(detail),
                    ..Target::default()
                },
                decision,
                reason,
            });
        }
    }

    fn workload_actor(
        facts: Option<&PeerFacts>,
        caller: &CallerCred,
        workload: Option<&str>,
    ) -> Actor {
        Actor {
            kind: ActorKind::Workload,
            uid: Some(caller.uid),
            user: crate::paths::user_name(caller.uid),
            pid: caller.pid,
            exe: facts.and_then(|f| f.exe_path.as_ref().map(|p| p.display().to_string())),
            workload: workload.map(String::from),
        }
    }

    /// Attests the caller; a refusal is audited and counted.
    fn attest(&self, caller: &CallerCred, op: &str) -> Result<Attested, IdentityError> {
        let t0 = std::time::Instant::now();
        let res = (|| {
            let pid = caller
                .pid
                .ok_or_else(|| "the kernel did not report the caller's pid".to_string())?;
            let facts = attest::gather_facts(pid, &self.hashes).map_err(|e| e.to_string())?;
            let reg = attest::attest(&facts, &self.registrations).map_err(|e| e.to_string())?;
            let (workload, spiffe_id) = (reg.name.clone(), reg.spiffe_id.clone());
            attest::confirm_same_process(&facts).map_err(|e| e.to_string())?;
            if let Some(f) = self.freezer.as_ref().and_then(|f| f.frozen(&workload)) {
                return Err(format!(
                    "workload {workload:?} is frozen since {} by {}: {}",
                    f.since, f.by, f.reason
                ));
            }
            Ok::<_, String>(Attested {
                facts,
                workload,
                spiffe_id,
            })
        })();
        self.metrics
            .attestation(AttestVia::WorkloadApi, res.is_ok(), t0.elapsed());
        res.map_err(|why| {
            self.metrics.workload_api_denied(op);
            tracing::warn!(uid = caller.uid, pid = ?caller.pid, "Workload API {op} refused: {why}");
            self.audit(
                Self::workload_actor(None, caller, None),
                "svid.deny",
                Decision::Deny,
                format!("Workload API {op}"),
                why.clone(),
            );
            IdentityError::PermissionDenied(why)
        })
    }

    fn with_authority<T>(
        &self,
        f: impl FnOnce(&mut crate::authority::IdentityAuthority) -> Result<T, IdentityError>,
    ) -> Result<T, IdentityError> {
        let mut guard = self
            .identity
            .authority
            .lock()
            .map_err(|_| IdentityError::Internal("identity state poisoned".into()))?;
        match guard.as_mut() {
            Some(a) => f(a),
            None => Err(IdentityError::Unavailable(
                "warden is sealed or still loading its CA; retry shortly".into(),
            )),
        }
    }

    fn trust_domain(&self) -> String {
        self.identity.settings.trust_domain.as_str().to_string()
    }
}

impl IdentityProvider for WorkloadIdentityProvider {
    fn x509_svids(&self, caller: &CallerCred) -> Result<Vec<X509SvidMaterial>, IdentityError> {
        let who = self.attest(caller, "FetchX509SVID")?;
        let (svid, fresh, bundle) = self.with_authority(|a| {
            let (svid, fresh) = a
                .svid_for(
                    &who.workload,
                    &who.spiffe_id,
                    time::OffsetDateTime::now_utc(),
                )
                .map_err(|e| {
                    self.metrics.svid_issuance_error();
                    IdentityError::Internal(e.message)
                })?;
            Ok((svid, fresh, a.bundle_der()))
        })?;
        if let Some(a) = &self.anomaly {
            a.issue(
                &who.workload,
                who.facts.pid,
                who.facts.exe_sha256.as_deref(),
            );
        }
        if fresh {
            self.identity.wake.notify_one();
            self.metrics.svid_issued();
            self.audit(
                Self::workload_actor(Some(&who.facts), caller, Some(&who.workload)),
                "svid.issue",
                Decision::Allow,
                format!("{} serial {}", who.spiffe_id, svid.serial_hex),
                "X.509-SVID issued through the Workload API".into(),
            );
        }
        Ok(vec![X509SvidMaterial {
            spiffe_id: who.spiffe_id,
            cert_chain_der: svid.cert_chain_der.clone(),
            key_pkcs8_der: svid.key_pkcs8.clone(),
            bundle_der: bundle,
            hint: who.workload,
        }])
    }

    fn x509_bundles(&self, caller: &CallerCred) -> Result<Vec<X509BundleEntry>, IdentityError> {
        self.attest(caller, "FetchX509Bundles")?;
        let bundle = self.with_authority(|a| Ok(a.bundle_der()))?;
        Ok(vec![(self.trust_domain(), bundle)])
    }

    fn jwt_svids(
        &self,
        caller: &CallerCred,
        audience: &[String],
        spiffe_id: Option<&str>,
    ) -> Result<Vec<(String, String)>, IdentityError> {
        let who = self.attest(caller, "FetchJWTSVID")?;
        if let Some(id) = spiffe_id {
            if id != who.spiffe_id {
                return Err(IdentityError::PermissionDenied(format!(
                    "this process is {} and may not request {id}",
                    who.spiffe_id
                )));
            }
        }
        let token = self.with_authority(|a| {
            a.jwt_svid(&who.spiffe_id, audience)
                .map_err(|e| IdentityError::InvalidArgument(e.message))
        })?;
        self.audit(
            Self::workload_actor(Some(&who.facts), caller, Some(&who.workload)),
            "jwt.issue",
            Decision::Allow,
            format!("{} audience {}", who.spiffe_id, audience.join(",")),
            "JWT-SVID issued through the Workload API".into(),
        );
        Ok(vec![(who.spiffe_id, token)])
    }

    fn jwt_bundles(&self, caller: &CallerCred) -> Result<Vec<(String, Vec<u8>)>, IdentityError> {
        self.attest(caller, "FetchJWTBundles")?;
        let keys = self.with_authority(|a| Ok(a.jwt_keys()))?;
        Ok(vec![(
            self.trust_domain(),
            warden_identity::jwt::jwks(&keys),
        )])
    }

    fn validate_jwt(
        &self,
        caller: &CallerCred,
        audience: &str,
        token: &str,
    ) -> Result<(String, serde_json::Map<String, serde_json::Value>), IdentityError> {
        self.attest(caller, "ValidateJWTSVID")?;
        let keys = self.with_authority(|a| Ok(a.jwt_keys()))?;
        let v =
            warden_identity::jwt::validate(token, audience, &keys, std::time::SystemTime::now())
                .map_err(|e| IdentityError::InvalidArgument(e.to_string()))?;
        Ok((v.spiffe_id, v.claims))
    }

    fn updates(&self) -> tokio::sync::watch::Receiver<u64> {
        self.identity.subscribe()
    }

    fn stream_opened(&self, op: &'static str) -> Option<Box<dyn Send>> {
        let guard: GaugeGuard = self.metrics.workload_api_stream(op);
        Some(Box::new(guard))
    }
}
