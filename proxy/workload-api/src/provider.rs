//! The daemon's side of the SPIFFE Workload API: who is calling (attestation
//! of the socket peer), and what they get (their SVIDs, the bundle, JWTs).
//!
//! Data path per request: SO_PEERCRED pid → facts from /proc (exe hashed via
//! /proc/PID/exe) → the one matching `[[workload]]` registration → pid-reuse
//! check → the authority's SVID for that workload. Every refusal and every
//! newly issued SVID is an audit record; refusals are counted in metrics.

use crate::{CallerCred, IdentityError, IdentityProvider, X509BundleEntry, X509SvidMaterial};
use std::sync::Arc;
use warden_core::admission::{Admission, Denial, Peer};
use warden_core::audit::{Decision, Event, Target};
use warden_core::authority::IdentityHandle;
use warden_core::metrics::{AttestVia, GaugeGuard, Metrics};
use warden_core::peer::{actor, Attested};

pub struct WorkloadIdentityProvider {
    admission: Arc<Admission>,
    identity: Arc<IdentityHandle>,
    metrics: Metrics,
}

impl WorkloadIdentityProvider {
    pub fn new(admission: Arc<Admission>, identity: Arc<IdentityHandle>, metrics: Metrics) -> Self {
        WorkloadIdentityProvider {
            admission,
            identity,
            metrics,
        }
    }

    fn audit(&self, who: &Attested, action: &str, detail: String, reason: String) {
        let _ = self.admission.audit().record_blocking(Event {
            actor: actor(Some(who)),
            action: action.into(),
            target: Target {
                detail: Some(detail),
                ..Target::default()
            },
            decision: Decision::Allow,
            reason,
        });
    }

    /// Attests the caller through the admission step (attested, not
    /// frozen); a refusal is audited, counted and signalled to the anomaly
    /// detector there.
    fn attest(&self, caller: &CallerCred, op: &str) -> Result<Attested, IdentityError> {
        let peer = Peer::Unix {
            pid: caller.pid,
            accepted_ns: caller.accepted_ns,
        };
        let who = self.admission.attest_blocking(peer, AttestVia::WorkloadApi);
        let checked = match &who {
            Err(u) => Err(Denial::Unattested {
                route: String::new(),
                reason: u.reason.trim_start_matches("warden: ").to_string(),
            }),
            Ok(w) => self.admission.check_frozen(&w.workload),
        };
        match checked {
            Ok(()) => who.map_err(|u| IdentityError::Internal(u.reason)),
            Err(d) => {
                self.admission.refuse_identity_request(op, &who, &d);
                let message = d.to_string();
                Err(IdentityError::PermissionDenied(
                    message.trim_start_matches("warden: ").to_string(),
                ))
            }
        }
    }

    fn with_authority<T>(
        &self,
        f: impl FnOnce(&mut warden_core::authority::IdentityAuthority) -> Result<T, IdentityError>,
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
        self.admission.issued(&who);
        if fresh {
            self.identity.wake.notify_one();
            self.metrics.svid_issued();
            self.audit(
                &who,
                "svid.issue",
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
            &who,
            "jwt.issue",
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
