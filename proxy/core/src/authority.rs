//! The identity authority: warden's CA(s), persisted in the encrypted store, the
//! trust bundle, and the X.509-SVIDs issued to workloads, rotated on schedule.
//!
//! Persistence: the CA certificates (public) are kept in the store's metadata
//! under [`CA_META_KEY`]; each CA private key is a secret named
//! `warden/ca/<serial>` in the `system` environment, envelope-encrypted like any
//! other secret. Names under `warden/` are reserved: users cannot put, read or
//! remove them.
//!
//! Rotation: SVIDs are refreshed at half-life ±10%; a self-signed CA gets a
//! successor when the overlap window starts (see `warden_identity::rotation`),
//! which joins the bundle at once and takes over issuance after one SVID TTL.
//! An imported CA cannot be renewed by warden: it is used until it expires and
//! `warden status` / the logs warn as that approaches.

use crate::audit::{Actor, ActorKind, Decision, Event, Target};
use crate::auditor::Auditor;
use crate::error::{Error, Result};
use crate::masterkey::Kek;
use crate::paths;
use crate::store::{NewVersion, SecretStore};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;
use time::OffsetDateTime;
use warden_identity::ca::{certs_to_pem, is_self_signed_der, pem_certs, TlsServerCert};
use warden_identity::jwt::JwtSigner;
use warden_identity::rotation::{random_unit_jitter, svid_refresh_at, CaSchedule};
use warden_identity::{CaMaterial, CertificateAuthority, KeyType, SpiffeId, TrustDomain, X509Svid};
use zeroize::Zeroizing;

pub const CA_META_KEY: &str = "ca_state";

/// The store claim of changing the CA list (a fleet store: one node at a time).
const CA_JOB: &str = "ca.maintenance";
/// Longer than a CA step takes (a key generation and a few store writes).
const CA_CLAIM_TTL: std::time::Duration = std::time::Duration::from_secs(60);
/// Metadata naming the sealed JWT-SVID signing key.
pub const JWT_META_KEY: &str = "jwt_key";
/// Lifetime of JWT-SVIDs: bearer tokens stay short-lived.
pub const JWT_SVID_TTL: Duration = Duration::from_secs(300);
/// Environment holding warden's own keys.
pub const SYSTEM_ENV: &str = "system";
/// Secret names reserved for warden's own keys.
pub const RESERVED_PREFIX: &str = "warden/";

/// Refuses user operations on reserved names.
pub fn check_not_reserved(name: &str) -> Result<()> {
    if name.starts_with(RESERVED_PREFIX) {
        return Err(Error::denied(format!(
            "secret names under {RESERVED_PREFIX:?} are reserved for warden's own keys ({name:?})"
        )));
    }
    Ok(())
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct CaRecord {
    serial: String,
    cert_pem: String,
    #[serde(default)]
    chain_pem: String,
    key_secret: String,
    key_version: u32,
    published_at: String,
    active: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct CaState {
    trust_domain: String,
    authorities: Vec<CaRecord>,
}

/// What the authority needs from the store: sealed keys, metadata, audit.
pub struct StoreAccess<'a> {
    pub store: &'a mut SecretStore,
    pub kek: &'a Kek,
    pub audit: &'a Auditor,
}

/// The daemon itself as an audit actor.
pub fn daemon_actor() -> Actor {
    Actor {
        kind: ActorKind::Daemon,
        uid: Some(paths::euid()),
        // Looked up once: the daemon's own user does not change.
        user: {
            static NAME: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();
            NAME.get_or_init(|| paths::user_name(paths::euid())).clone()
        },
        pid: Some(std::process::id()),
        exe: None,
        workload: None,
    }
}

fn parse_rfc3339(s: &str) -> Result<OffsetDateTime> {
    OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339)
        .map_err(|e| Error::integrity(format!("CA state holds a bad timestamp {s:?}: {e}")))
}

impl StoreAccess<'_> {
    fn record(&mut self, action: &str, detail: String, reason: &str) -> Result<()> {
        self.audit.record(&Event {
            actor: daemon_actor(),
            action: action.into(),
            target: Target {
                detail: Some(detail),
                ..Target::default()
            },
            decision: Decision::Allow,
            reason: reason.into(),
        })?;
        Ok(())
    }

    /// Seals one of warden's own keys as `warden/<what>` in the system env.
    fn put_sealed_key(&mut self, what: &str, pkcs8: &[u8]) -> Result<(String, u32)> {
        let name = format!("{RESERVED_PREFIX}{what}");
        let audit = self.audit;
        let mut hook = |v: u32| -> Result<()> {
            audit.record(&Event {
                actor: daemon_actor(),
                action: "key.store".into(),
                target: Target {
                    secret: Some(format!("{RESERVED_PREFIX}{what}")),
                    env: Some(SYSTEM_ENV.into()),
                    version: Some(v),
                    ..Target::default()
                },
                decision: Decision::Allow,
                reason: "warden's own private key sealed in the store".into(),
            })?;
            Ok(())
        };
        let v = self.store.put(
            self.kek,
            NewVersion {
                name: &name,
                env: SYSTEM_ENV,
                value: pkcs8,
                created_by: "warden",
                keep: 1,
            },
            &mut hook,
        )?;
        Ok((name, v))
    }

    fn load_state(&self) -> Result<Option<CaState>> {
        match self.store.backend().meta_get(CA_META_KEY)? {
            None => Ok(None),
            Some(j) => serde_json::from_str(&j)
                .map(Some)
                .map_err(|e| Error::integrity(format!("the store's CA state is unreadable: {e}"))),
        }
    }

    fn save_state(&mut self, st: &CaState) -> Result<()> {
        let j = serde_json::to_string(st).map_err(|e| Error::internal(e.to_string()))?;
        self.store.backend_mut().meta_set(CA_META_KEY, &j)
    }
}

/// An upstream intermediate to import at init (`--ca-cert --ca-key [--ca-bundle]`).
pub struct ImportedCa {
    pub cert_pem: String,
    pub key_pem: Zeroizing<String>,
    pub chain_pem: String,
}

/// Identity settings from the configuration.
#[derive(Debug, Clone)]
pub struct IdentitySettings {
    pub trust_domain: TrustDomain,
    pub svid_ttl: Duration,
    pub ca_ttl: Duration,
    pub key_type: KeyType,
}

impl IdentitySettings {
    pub fn from_config(cfg: &crate::config::Config) -> Result<IdentitySettings> {
        let trust_domain = TrustDomain::parse(&cfg.trust_domain)
            .map_err(|e| Error::usage(format!("trust_domain: {e}")))?;
        let key_type = KeyType::parse(cfg.identity.key_type.as_str()).ok_or_else(|| {
            Error::usage(format!(
                "identity.key_type: {} is not supported by this build",
                cfg.identity.key_type
            ))
        })?;
        Ok(IdentitySettings {
            trust_domain,
            svid_ttl: cfg.identity.svid_ttl,
            ca_ttl: cfg.identity.ca_ttl(),
            key_type,
        })
    }

    fn schedule(&self) -> CaSchedule {
        CaSchedule {
            ca_ttl: self.ca_ttl,
            svid_ttl: self.svid_ttl,
        }
    }
}

struct LoadedCa {
    ca: CertificateAuthority,
    record: CaRecord,
    published_at: OffsetDateTime,
}

/// An SVID held for a workload until its refresh time.
pub struct IssuedSvid {
    pub workload: String,
    pub svid: Arc<X509Svid>,
    pub refresh_at: OffsetDateTime,
}

/// Public facts about an issued SVID (for `warden svid show`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct SvidInfo {
    pub workload: String,
    pub spiffe_id: String,
    pub serial: String,
    pub key_type: String,
    pub not_before: String,
    pub not_after: String,
    pub refresh_at: String,
    pub ca_serial: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub chain_pem: String,
}

pub struct IdentityAuthority {
    settings: IdentitySettings,
    cas: Vec<LoadedCa>,
    svids: HashMap<String, IssuedSvid>,
    jwt: JwtSigner,
    /// TLS server certificates of local listeners, by listener name.
    server_certs: HashMap<String, (Arc<TlsServerCert>, OffsetDateTime)>,
    /// SVIDs reissued by `tick` since the last `take_rotated` (for metrics).
    rotated: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct JwtKeyRecord {
    secret: String,
    version: u32,
    kid: String,
}

fn fmt(t: OffsetDateTime) -> String {
    crate::timefmt::format_rfc3339(t)
}

impl IdentityAuthority {
    /// Loads the CAs from the store, creating (or importing) the first one if
    /// the store has none.
    pub fn load_or_create(
        access: &mut StoreAccess<'_>,
        settings: IdentitySettings,
        import: Option<ImportedCa>,
        now: OffsetDateTime,
    ) -> Result<IdentityAuthority> {
        let state = match access.load_state()? {
            Some(st) => {
                if import.is_some() {
                    return Err(Error::usage(
                        "this store already has a CA; --ca-cert/--ca-key only apply to a new store",
                    ));
                }
                if st.trust_domain != settings.trust_domain.as_str() {
                    return Err(Error::usage(format!(
                        "trust_domain: the config says {:?} but this store's CA is for {:?}; fix: set trust_domain = \"{}\" (a store's trust domain cannot change)",
                        settings.trust_domain.as_str(),
                        st.trust_domain,
                        st.trust_domain
                    )));
                }
                st
            }
            None => {
                let (ca, material) = match &import {
                    None => CertificateAuthority::create_root(
                        &settings.trust_domain,
                        settings.ca_ttl,
                        now,
                    ),
                    Some(imp) => CertificateAuthority::import_pem(
                        &settings.trust_domain,
                        &imp.cert_pem,
                        &imp.key_pem,
                        &imp.chain_pem,
                    ),
                }
                .map_err(|e| Error::usage(e.to_string()))?;
                let record = Self::persist_new_ca(access, &ca, &material, now, true)?;
                let st = CaState {
                    trust_domain: settings.trust_domain.as_str().to_string(),
                    authorities: vec![record],
                };
                access.save_state(&st)?;
                access.record(
                    "ca.create",
                    format!(
                        "{} CA serial {} for {} valid until {}",
                        if import.is_some() {
                            "imported"
                        } else {
                            "self-signed"
                        },
                        ca.serial_hex(),
                        settings.trust_domain,
                        fmt(ca.not_after())
                    ),
                    "first CA of this store",
                )?;
                st
            }
        };
        let mut cas = Vec::new();
        for rec in state.authorities {
            cas.push(Self::load_ca(access, &settings, rec)?);
        }
        let jwt = Self::load_or_create_jwt(access)?;
        let mut auth = IdentityAuthority {
            settings,
            cas,
            svids: HashMap::new(),
            jwt,
            server_certs: HashMap::new(),
            rotated: 0,
        };
        auth.tick(access, now)?;
        Ok(auth)
    }

    /// One CA of the store's state, with its key unsealed.
    fn load_ca(
        access: &mut StoreAccess<'_>,
        settings: &IdentitySettings,
        rec: CaRecord,
    ) -> Result<LoadedCa> {
        let key = access
            .store
            .get(
                access.kek,
                &rec.key_secret,
                SYSTEM_ENV,
                Some(rec.key_version),
            )?
            .1;
        let material = CaMaterial {
            cert_der: pem_certs(&rec.cert_pem)
                .map_err(|e| Error::integrity(e.to_string()))?
                .into_iter()
                .next()
                .ok_or_else(|| Error::integrity("CA state holds no certificate"))?,
            key_pkcs8: key,
            chain_der: pem_certs(&rec.chain_pem).map_err(|e| Error::integrity(e.to_string()))?,
        };
        let ca = CertificateAuthority::from_material(&settings.trust_domain, &material)
            .map_err(|e| Error::integrity(format!("stored CA {}: {e}", rec.serial)))?;
        let published_at = parse_rfc3339(&rec.published_at)?;
        Ok(LoadedCa {
            ca,
            record: rec,
            published_at,
        })
    }

    /// Takes the store's CA list as it is now (a shared store, where another
    /// node may have added, activated or retired a CA). True when it differed.
    fn sync_cas(&mut self, access: &mut StoreAccess<'_>) -> Result<bool> {
        let Some(state) = access.load_state()? else {
            return Ok(false);
        };
        let same = state.authorities.len() == self.cas.len()
            && state
                .authorities
                .iter()
                .zip(&self.cas)
                .all(|(r, c)| r.serial == c.record.serial && r.active == c.record.active);
        if same {
            return Ok(false);
        }
        let mut held = std::mem::take(&mut self.cas);
        let mut cas = Vec::with_capacity(state.authorities.len());
        for rec in state.authorities {
            match held.iter().position(|c| c.record.serial == rec.serial) {
                Some(i) => {
                    let mut c = held.swap_remove(i);
                    c.published_at = parse_rfc3339(&rec.published_at)?;
                    c.record = rec;
                    cas.push(c);
                }
                None => match Self::load_ca(access, &self.settings, rec) {
                    Ok(c) => cas.push(c),
                    Err(e) => {
                        // Keep what this node had rather than lose its CAs.
                        cas.extend(held);
                        self.cas = cas;
                        return Err(e);
                    }
                },
            }
        }
        self.cas = cas;
        tracing::info!("CA state taken from the store (changed by another node)");
        Ok(true)
    }

    fn load_or_create_jwt(access: &mut StoreAccess<'_>) -> Result<JwtSigner> {
        if let Some(j) = access.store.backend().meta_get(JWT_META_KEY)? {
            let rec: JwtKeyRecord = serde_json::from_str(&j)
                .map_err(|e| Error::integrity(format!("JWT key record unreadable: {e}")))?;
            let der = access
                .store
                .get(access.kek, &rec.secret, SYSTEM_ENV, Some(rec.version))?
                .1;
            return JwtSigner::from_pkcs8(&der)
                .map_err(|e| Error::integrity(format!("stored JWT signing key: {e}")));
        }
        let signer = JwtSigner::generate().map_err(|e| Error::internal(e.to_string()))?;
        let kid = signer.key_id().to_string();
        // Secret names are lowercase; name the key by a digest of its kid.
        let tag = &crate::crypto::sha256_hex(kid.as_bytes())[..32];
        let (secret, version) =
            access.put_sealed_key(&format!("jwt/{tag}"), &signer.pkcs8_der())?;
        let rec = JwtKeyRecord {
            secret,
            version,
            kid: kid.clone(),
        };
        let j = serde_json::to_string(&rec).map_err(|e| Error::internal(e.to_string()))?;
        access.store.backend_mut().meta_set(JWT_META_KEY, &j)?;
        access.record(
            "jwt.key.create",
            format!("JWT-SVID signing key {kid} (ES256)"),
            "first JWT key of this store",
        )?;
        Ok(signer)
    }

    /// The TLS server certificate for listener `key` (names `dns`/`ips`),
    /// issued by the active CA and replaced at half-life.
    pub fn server_cert(
        &mut self,
        key: &str,
        dns: &[String],
        ips: &[std::net::IpAddr],
        now: OffsetDateTime,
    ) -> Result<Arc<TlsServerCert>> {
        if let Some((cert, refresh)) = self.server_certs.get(key) {
            if *refresh > now {
                return Ok(cert.clone());
            }
        }
        let cert = self
            .active()?
            .ca
            .issue_tls_server(dns, ips, self.settings.svid_ttl, now)
            .map_err(|e| Error::internal(format!("TLS certificate for {key}: {e}")))?;
        let refresh = svid_refresh_at(cert.not_before, cert.not_after, random_unit_jitter());
        let cert = Arc::new(cert);
        self.server_certs
            .insert(key.to_string(), (cert.clone(), refresh));
        Ok(cert)
    }

    /// A JWT-SVID for `spiffe_id` and `audience` (ES256, [`JWT_SVID_TTL`]).
    pub fn jwt_svid(&self, spiffe_id: &str, audience: &[String]) -> Result<String> {
        self.jwt
            .sign_svid(
                spiffe_id,
                audience,
                JWT_SVID_TTL,
                std::time::SystemTime::now(),
            )
            .map_err(|e| Error::usage(e.to_string()))
    }

    /// The public JWKs that verify this authority's JWT-SVIDs.
    pub fn jwt_keys(&self) -> Vec<serde_json::Value> {
        vec![self.jwt.public_jwk()]
    }

    fn persist_new_ca(
        access: &mut StoreAccess<'_>,
        ca: &CertificateAuthority,
        material: &CaMaterial,
        now: OffsetDateTime,
        active: bool,
    ) -> Result<CaRecord> {
        let (key_secret, key_version) =
            access.put_sealed_key(&format!("ca/{}", ca.serial_hex()), &material.key_pkcs8)?;
        Ok(CaRecord {
            serial: ca.serial_hex().to_string(),
            cert_pem: certs_to_pem(std::slice::from_ref(&material.cert_der)),
            chain_pem: certs_to_pem(&material.chain_der),
            key_secret,
            key_version,
            published_at: fmt(now),
            active,
        })
    }

    fn save(&self, access: &mut StoreAccess<'_>) -> Result<()> {
        access.save_state(&CaState {
            trust_domain: self.settings.trust_domain.as_str().to_string(),
            authorities: self.cas.iter().map(|c| c.record.clone()).collect(),
        })
    }

    fn active(&self) -> Result<&LoadedCa> {
        self.cas
            .iter()
            .find(|c| c.record.active)
            .ok_or_else(|| Error::integrity("the store's CA state has no active CA"))
    }

    #[allow(dead_code)] // used by the Workload API server
    /// Trust anchors of every CA in the bundle (current, successor, and
    /// predecessors until they expire).
    pub fn bundle_der(&self) -> Vec<Vec<u8>> {
        let mut out: Vec<Vec<u8>> = Vec::new();
        for c in &self.cas {
            for a in c.ca.trust_anchors_der() {
                if !out.contains(&a) {
                    out.push(a);
                }
            }
        }
        out
    }

    /// The current SVID of `workload`, issuing one if it has none or its
    /// refresh time has passed. Returns whether a new one was issued.
    pub fn svid_for(
        &mut self,
        workload: &str,
        spiffe_id: &str,
        now: OffsetDateTime,
    ) -> Result<(Arc<X509Svid>, bool)> {
        if let Some(s) = self.svids.get(workload) {
            if s.refresh_at > now && s.svid.spiffe_id.to_string() == spiffe_id {
                return Ok((s.svid.clone(), false));
            }
        }
        let issued = self.issue(workload, spiffe_id, now)?;
        let svid = issued.svid.clone();
        self.svids.insert(workload.to_string(), issued);
        Ok((svid, true))
    }

    fn issue(&self, workload: &str, spiffe_id: &str, now: OffsetDateTime) -> Result<IssuedSvid> {
        let id = SpiffeId::parse(spiffe_id).map_err(|e| Error::usage(e.to_string()))?;
        let ca = &self.active()?.ca;
        let svid = ca
            .issue_svid(&id, self.settings.svid_ttl, self.settings.key_type, now)
            .map_err(|e| Error::internal(format!("SVID issuance for {workload}: {e}")))?;
        let refresh_at = svid_refresh_at(svid.not_before, svid.not_after, random_unit_jitter());
        Ok(IssuedSvid {
            workload: workload.to_string(),
            svid: Arc::new(svid),
            refresh_at,
        })
    }

    /// Drops the SVID held for `workload` (e.g. when it is frozen). Returns
    /// whether there was one.
    #[cfg_attr(not(test), allow(dead_code))] // freezing a workload (anomaly issue) drops its SVID
    pub fn forget(&mut self, workload: &str) -> bool {
        self.svids.remove(workload).is_some()
    }

    pub fn info(&self, workload: &str) -> Option<SvidInfo> {
        let s = self.svids.get(workload)?;
        let active_serial = self
            .active()
            .map(|c| c.record.serial.clone())
            .unwrap_or_default();
        Some(SvidInfo {
            workload: workload.to_string(),
            spiffe_id: s.svid.spiffe_id.to_string(),
            serial: s.svid.serial_hex.clone(),
            key_type: s.svid.key_type.as_str().to_string(),
            not_before: fmt(s.svid.not_before),
            not_after: fmt(s.svid.not_after),
            refresh_at: fmt(s.refresh_at),
            ca_serial: active_serial,
            chain_pem: certs_to_pem(&s.svid.cert_chain_der),
        })
    }

    /// Periodic maintenance: CA successor, CA switch, CA retirement, SVID
    /// refresh. Returns true when anything changed (the caller notifies
    /// Workload API streams).
    pub fn tick(&mut self, access: &mut StoreAccess<'_>, now: OffsetDateTime) -> Result<bool> {
        // On a store shared by a fleet, one node at a time changes the CAs
        // (claim), after taking the store's current list; the others take
        // that list and leave the CA steps to it.
        let fleet = access.store.backend().node().is_some();
        let mut changed = false;
        let mut claimed = true;
        if fleet {
            // A store that cannot be reached skips the CA steps (they need
            // it anyway) but never the SVID refresh below.
            let synced = access
                .store
                .backend_mut()
                .claim(CA_JOB, CA_CLAIM_TTL)
                .and_then(|c| {
                    claimed = c;
                    self.sync_cas(access)
                });
            match synced {
                Ok(c) => changed |= c,
                Err(e) => {
                    if claimed {
                        let _ = access.store.backend_mut().release_claim(CA_JOB);
                        claimed = false;
                    }
                    tracing::warn!(
                        "CA maintenance skipped this time (the store's CA list could not be read): {}",
                        e.message
                    );
                }
            }
        }
        if claimed {
            let ca_steps = self.tick_cas(access, now);
            if fleet {
                if let Err(e) = access.store.backend_mut().release_claim(CA_JOB) {
                    tracing::warn!("CA claim not released (it lapses by itself): {}", e.message);
                }
            }
            changed |= ca_steps?;
        }
        changed |= self.refresh_svids(access, now)?;
        Ok(changed)
    }

    /// Retires expired CAs, prepares a successor, switches to it.
    fn tick_cas(&mut self, access: &mut StoreAccess<'_>, now: OffsetDateTime) -> Result<bool> {
        let mut changed = false;
        let schedule = self.settings.schedule();
        // Retire expired CAs (never the only one).
        let before = self.cas.len();
        let expired: Vec<String> = self
            .cas
            .iter()
            .filter(|c| c.ca.not_after() <= now && !c.record.active)
            .map(|c| c.record.serial.clone())
            .collect();
        self.cas
            .retain(|c| c.ca.not_after() > now || c.record.active);
        if self.cas.len() != before {
            self.save(access)?;
            for serial in expired {
                access.record(
                    "ca.retire",
                    format!("CA serial {serial} expired and left the bundle"),
                    "expired",
                )?;
            }
            changed = true;
        }
        // Prepare a successor for a self-signed active CA entering the overlap window.
        let active = self.active()?;
        let has_successor = self
            .cas
            .iter()
            .any(|c| !c.record.active && c.ca.not_after() > active.ca.not_after());
        if !active.ca.is_imported()
            && !has_successor
            && schedule.needs_successor(active.ca.not_after(), now)
        {
            let (ca, material) = CertificateAuthority::create_root(
                &self.settings.trust_domain,
                self.settings.ca_ttl,
                now,
            )
            .map_err(|e| Error::internal(e.to_string()))?;
            let record = Self::persist_new_ca(access, &ca, &material, now, false)?;
            access.record(
                "ca.create",
                format!(
                    "successor CA serial {} valid until {}",
                    ca.serial_hex(),
                    fmt(ca.not_after())
                ),
                "the current CA entered its overlap window; the successor is in the bundle now",
            )?;
            self.cas.push(LoadedCa {
                ca,
                record,
                published_at: now,
            });
            self.save(access)?;
            changed = true;
        }
        // Switch issuance once the successor has been published for an SVID TTL.
        let switch_to = self
            .cas
            .iter()
            .position(|c| {
                !c.record.active
                    && c.ca.not_after() > now
                    && schedule.may_switch(c.published_at, now)
            })
            .filter(|&i| {
                self.active()
                    .map(|a| self.cas[i].ca.not_after() > a.ca.not_after())
                    .unwrap_or(false)
            });
        if let Some(i) = switch_to {
            for c in &mut self.cas {
                c.record.active = false;
            }
            self.cas[i].record.active = true;
            let serial = self.cas[i].record.serial.clone();
            self.save(access)?;
            access.record(
                "ca.activate",
                format!("CA serial {serial} now signs new SVIDs"),
                "successor published for one SVID TTL",
            )?;
            changed = true;
        }
        Ok(changed)
    }

    /// Re-issues SVIDs that reached their refresh time.
    fn refresh_svids(&mut self, access: &mut StoreAccess<'_>, now: OffsetDateTime) -> Result<bool> {
        let mut changed = false;
        // Refresh SVIDs that reached their refresh time.
        let due: Vec<(String, String)> = self
            .svids
            .values()
            .filter(|s| s.refresh_at <= now)
            .map(|s| (s.workload.clone(), s.svid.spiffe_id.to_string()))
            .collect();
        for (w, id) in due {
            let issued = self.issue(&w, &id, now)?;
            access.record(
                "svid.rotate",
                format!("{w} {id} serial {}", issued.svid.serial_hex),
                "refresh at half-life",
            )?;
            self.svids.insert(w, issued);
            self.rotated += 1;
            changed = true;
        }
        Ok(changed)
    }

    /// When the soonest-expiring held SVID and the signing CA expire (metrics).
    pub fn expiries(&self) -> (Option<OffsetDateTime>, Option<OffsetDateTime>) {
        let svid = self.svids.values().map(|s| s.svid.not_after).min();
        let ca = self.active().ok().map(|c| c.ca.not_after());
        (svid, ca)
    }

    /// How many SVIDs `tick` reissued since the last call.
    pub fn take_rotated(&mut self) -> u64 {
        std::mem::take(&mut self.rotated)
    }

    /// When [`IdentityAuthority::tick`] next has something to do.
    pub fn next_tick(&self, now: OffsetDateTime) -> OffsetDateTime {
        let mut next = now + time::Duration::minutes(1);
        for s in self.svids.values() {
            next = next.min(s.refresh_at);
        }
        next.max(now + time::Duration::milliseconds(200))
    }
}

/// The trust bundle PEM straight from the store's metadata (no key needed).
pub fn bundle_pem_from_store(store: &SecretStore) -> Result<String> {
    let Some(j) = store.backend().meta_get(CA_META_KEY)? else {
        return Err(Error::not_found(
            "this store has no CA yet: it is created by `warden init` or the first `warden up`",
        ));
    };
    let st: CaState = serde_json::from_str(&j)
        .map_err(|e| Error::integrity(format!("CA state unreadable: {e}")))?;
    let mut ders: Vec<Vec<u8>> = Vec::new();
    for rec in &st.authorities {
        let chain = pem_certs(&rec.chain_pem).map_err(|e| Error::integrity(e.to_string()))?;
        let roots: Vec<Vec<u8>> = chain
            .into_iter()
            .filter(|d| is_self_signed_der(d))
            .collect();
        let anchors = if roots.is_empty() {
            pem_certs(&rec.cert_pem).map_err(|e| Error::integrity(e.to_string()))?
        } else {
            roots
        };
        for a in anchors {
            if !ders.contains(&a) {
                ders.push(a);
            }
        }
    }
    Ok(certs_to_pem(&ders))
}

/// The daemon's shared identity state: the authority (None until the store is
/// unsealed and the CA loaded) and the registered workloads.
pub struct IdentityHandle {
    pub authority: std::sync::Mutex<Option<IdentityAuthority>>,
    pub workloads: Vec<(String, String)>,
    pub settings: IdentitySettings,
    /// Bumped whenever the bundle or an issued SVID changes, or the authority
    /// is loaded: Workload API streams re-send on every change.
    generation: tokio::sync::watch::Sender<u64>,
    /// Wakes the maintenance loop early (a new SVID may refresh sooner than
    /// the loop planned to wake).
    pub wake: tokio::sync::Notify,
}

impl IdentityHandle {
    pub fn new(cfg: &crate::config::Config) -> Result<IdentityHandle> {
        Ok(IdentityHandle {
            authority: std::sync::Mutex::new(None),
            workloads: cfg
                .workloads
                .iter()
                .map(|w| (w.name.clone(), w.spiffe_id.clone()))
                .collect(),
            settings: IdentitySettings::from_config(cfg)?,
            generation: tokio::sync::watch::channel(0).0,
            wake: tokio::sync::Notify::new(),
        })
    }

    /// Receives a new number whenever SVIDs or the bundle change.
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        self.generation.subscribe()
    }

    pub fn notify(&self) {
        self.generation.send_modify(|g| *g += 1);
    }

    /// The SPIFFE ID registered for `workload`.
    pub fn spiffe_id_of(&self, workload: &str) -> Result<&str> {
        self.workloads
            .iter()
            .find(|(n, _)| n == workload)
            .map(|(_, id)| id.as_str())
            .ok_or_else(|| {
                Error::not_found(format!(
                    "no workload {workload:?} in the configuration (see `warden workload list`)"
                ))
            })
    }

    /// Loads the authority if needed, then runs its maintenance against
    /// the unsealed store (see `SecretService::maintain_identity`). Returns
    /// how long to wait before the next call.
    pub fn maintain(
        &self,
        mut access: StoreAccess<'_>,
        metrics: Option<&crate::metrics::Metrics>,
    ) -> Result<Duration> {
        let mut guard = self
            .authority
            .lock()
            .map_err(|_| Error::internal("identity state poisoned"))?;
        let now = OffsetDateTime::now_utc();
        match guard.as_mut() {
            None => {
                *guard = Some(IdentityAuthority::load_or_create(
                    &mut access,
                    self.settings.clone(),
                    None,
                    now,
                )?);
                self.notify();
            }
            Some(a) => {
                let ticked = a.tick(&mut access, now);
                if ticked.is_err() {
                    if let Some(m) = metrics {
                        m.svid_issuance_error();
                    }
                }
                if ticked? {
                    self.notify();
                }
                if let Some(m) = metrics {
                    for _ in 0..a.take_rotated() {
                        m.svid_issued();
                    }
                }
            }
        }
        let next = guard.as_ref().map(|a| a.next_tick(now)).unwrap_or(now);
        let wait = (next - now).max(time::Duration::milliseconds(200));
        Ok(Duration::try_from(wait).unwrap_or(Duration::from_secs(1)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::Key256;
    use crate::store::sqlite::SqliteBackend;

    struct Fixture {
        _dir: tempfile::TempDir,
        store: SecretStore,
        kek: Kek,
        audit: Auditor,
    }

    impl Fixture {
        fn new() -> Fixture {
            let dir = tempfile::tempdir().unwrap();
            let store = SecretStore::new(Box::new(
                SqliteBackend::open(&dir.path().join("s.db")).unwrap(),
            ));
            let audit =
                Auditor::new(crate::audit::AuditLog::open(&dir.path().join("audit.log")).unwrap());
            Fixture {
                _dir: dir,
                store,
                kek: Kek::from_key(Key256::generate().unwrap()),
                audit,
            }
        }
        fn access(&mut self) -> StoreAccess<'_> {
            StoreAccess {
                store: &mut self.store,
                kek: &self.kek,
                audit: &self.audit,
            }
        }
    }

    fn settings(ca_ttl_min: u64, svid_ttl_min: u64) -> IdentitySettings {
        IdentitySettings {
            trust_domain: TrustDomain::parse("example.org").unwrap(),
            svid_ttl: Duration::from_secs(60 * svid_ttl_min),
            ca_ttl: Duration::from_secs(60 * ca_ttl_min),
            key_type: KeyType::EcP256,
        }
    }

    const ID: &str = "spiffe://example.org/reports";

    #[test]
    fn ca_is_created_once_sealed_in_the_store_and_reloaded() {
        let mut f = Fixture::new();
        let t0 = OffsetDateTime::now_utc();
        let a = IdentityAuthority::load_or_create(&mut f.access(), settings(600, 60), None, t0)
            .unwrap();
        let bundle = a.bundle_der();
        assert_eq!(bundle.len(), 1);
        // The CA key is an encrypted secret in the reserved namespace.
        let list = f.store.backend().list(Some(SYSTEM_ENV)).unwrap();
        let names: Vec<&str> = list.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names.len(), 2, "{names:?}");
        assert!(names[0].starts_with("warden/ca/") && names[1].starts_with("warden/jwt/"));
        let again = IdentityAuthority::load_or_create(&mut f.access(), settings(600, 60), None, t0)
            .unwrap();
        assert_eq!(
            again.bundle_der(),
            bundle,
            "reload must not create a new CA"
        );
        assert_eq!(
            bundle_pem_from_store(&f.store).unwrap(),
            certs_to_pem(&bundle)
        );
        // A different trust domain in the config is refused, naming the key.
        let mut other = settings(600, 60);
        other.trust_domain = TrustDomain::parse("other.org").unwrap();
        let e = IdentityAuthority::load_or_create(&mut f.access(), other, None, t0)
            .err()
            .unwrap();
        assert!(e.message.contains("trust_domain"), "{e}");
        // Users cannot touch the reserved names.
        assert!(check_not_reserved(&list[0].name).is_err());
        assert!(check_not_reserved("orders-db/app").is_ok());
    }

    #[test]
    fn svids_are_cached_until_refresh_then_reissued() {
        let mut f = Fixture::new();
        let t0 = OffsetDateTime::now_utc();
        let mut a = IdentityAuthority::load_or_create(&mut f.access(), settings(600, 60), None, t0)
            .unwrap();
        let (s1, fresh) = a.svid_for("reports", ID, t0).unwrap();
        assert!(fresh);
        let (s2, fresh) = a
            .svid_for("reports", ID, t0 + time::Duration::minutes(1))
            .unwrap();
        assert!(!fresh);
        assert_eq!(s1.serial_hex, s2.serial_hex);
        let info = a.info("reports").unwrap();
        let refresh = parse_rfc3339(&info.refresh_at).unwrap();
        // Half-life ±10% of a 60-minute SVID.
        assert!(refresh >= s1.not_before + time::Duration::minutes(27));
        assert!(refresh <= s1.not_before + time::Duration::minutes(34));
        assert!(!a
            .tick(&mut f.access(), t0 + time::Duration::minutes(1))
            .unwrap());
        // The maintenance tick reissues it at the refresh time (streams are notified).
        assert!(a
            .tick(&mut f.access(), refresh + time::Duration::seconds(1))
            .unwrap());
        let (s3, fresh) = a
            .svid_for("reports", ID, refresh + time::Duration::seconds(2))
            .unwrap();
        assert!(!fresh, "the tick already refreshed it");
        assert_ne!(s3.serial_hex, s1.serial_hex);
        // Forgetting (freeze) drops it.
        assert!(a.forget("reports"));
        assert!(a.info("reports").is_none());
    }

    #[test]
    fn a_node_takes_another_nodes_ca_changes_from_the_store() {
        let mut f = Fixture::new();
        let t0 = OffsetDateTime::now_utc();
        // Two authorities over one store, as two nodes of a fleet.
        let mut a =
            IdentityAuthority::load_or_create(&mut f.access(), settings(60, 10), None, t0).unwrap();
        let mut b =
            IdentityAuthority::load_or_create(&mut f.access(), settings(60, 10), None, t0).unwrap();
        assert!(!b.sync_cas(&mut f.access()).unwrap(), "nothing changed yet");
        // a prepares the successor; b takes it instead of making its own.
        a.tick(&mut f.access(), t0 + time::Duration::minutes(31))
            .unwrap();
        assert_eq!(a.bundle_der().len(), 2);
        assert!(b.sync_cas(&mut f.access()).unwrap());
        assert_eq!(b.bundle_der(), a.bundle_der());
        // a switches to it; b follows.
        a.tick(&mut f.access(), t0 + time::Duration::minutes(42))
            .unwrap();
        assert!(b.sync_cas(&mut f.access()).unwrap());
        assert_eq!(
            b.active().unwrap().record.serial,
            a.active().unwrap().record.serial
        );
        assert!(!b.sync_cas(&mut f.access()).unwrap());
    }

    #[test]
    fn ca_rotation_overlaps_then_switches_then_retires() {
        let mut f = Fixture::new();
        let t0 = OffsetDateTime::now_utc();
        // CA 60 min, SVID 10 min: overlap = max(10, 30) = 30 min.
        let mut a =
            IdentityAuthority::load_or_create(&mut f.access(), settings(60, 10), None, t0).unwrap();
        let first = a.bundle_der();
        let (s, _) = a.svid_for("reports", ID, t0).unwrap();
        let first_ca_serial = a.info("reports").unwrap().ca_serial;
        a.tick(&mut f.access(), t0 + time::Duration::minutes(5))
            .unwrap();
        assert_eq!(
            a.bundle_der().len(),
            1,
            "no successor before the overlap window"
        );
        // Entering the overlap window: a successor joins the bundle, issuance unchanged.
        let t1 = t0 + time::Duration::minutes(31);
        a.tick(&mut f.access(), t1).unwrap();
        let bundle = a.bundle_der();
        assert_eq!(
            bundle.len(),
            2,
            "successor must be published during the overlap"
        );
        assert!(bundle.contains(&first[0]));
        let (_, _) = a.svid_for("reports", ID, t1).unwrap();
        assert_eq!(a.info("reports").unwrap().ca_serial, first_ca_serial);
        // One SVID TTL later the successor signs.
        let t2 = t1 + time::Duration::minutes(10);
        a.tick(&mut f.access(), t2).unwrap();
        a.forget("reports");
        let (s2, _) = a.svid_for("reports", ID, t2).unwrap();
        assert_ne!(a.info("reports").unwrap().ca_serial, first_ca_serial);
        assert_ne!(s2.serial_hex, s.serial_hex);
        // State survives a reload with both CAs.
        let reloaded =
            IdentityAuthority::load_or_create(&mut f.access(), settings(60, 10), None, t2).unwrap();
        assert_eq!(reloaded.bundle_der().len(), 2);
        // After the first CA expires it leaves the bundle.
        let t3 = t0 + time::Duration::minutes(61);
        a.tick(&mut f.access(), t3).unwrap();
        // (The successor is itself in its overlap window by now, so its own
        // successor may already be published.)
        assert!(
            !a.bundle_der().contains(&first[0]),
            "expired CA still in the bundle"
        );
        let audit = std::fs::read_to_string(f._dir.path().join("audit.log")).unwrap();
        for action in [
            "ca.create",
            "ca.activate",
            "ca.retire",
            "key.store",
            "jwt.key.create",
        ] {
            assert!(audit.contains(action), "{action} not audited");
        }
    }

    #[test]
    fn svids_never_outlive_their_ca() {
        let mut f = Fixture::new();
        let t0 = OffsetDateTime::now_utc();
        let mut a =
            IdentityAuthority::load_or_create(&mut f.access(), settings(60, 10), None, t0).unwrap();
        // Near the end of the CA's life, before a switch, the leaf is clamped.
        let late = t0 + time::Duration::minutes(55);
        let (s, _) = a.svid_for("late", ID, late).unwrap();
        assert!(s.not_after <= t0 + time::Duration::minutes(60));
    }
}
