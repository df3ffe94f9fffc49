//! The key-encryption key (KEK, "secret zero") and where it comes from.
//!
//! Three sources, chosen at `warden init` and recorded (with a key check value,
//! never the key) in the store's `seal` metadata:
//! - `file`: a generated key file `master.key` (0600) in the data dir. Easy,
//!   and as safe as the file's permissions: production should use one of the
//!   other two.
//! - `shamir`: the KEK is split into N shares with threshold K (Shamir's scheme
//!   over GF(256), `blahaj` crate). The daemon starts sealed and serves nothing
//!   secret until `warden unseal` has delivered K valid shares.
//! - `systemd-credential`: the KEK is read from `$CREDENTIALS_DIRECTORY/NAME`
//!   (`LoadCredentialEncrypted=` in the unit), so it can be bound to the TPM.
//!
//! Each share's SHA-256 is recorded so a mistyped or foreign share is rejected
//! at once, with a message, instead of producing a wrong key.

use crate::crypto::{sha256_hex, Key256};
use crate::error::{Error, Result};
use crate::paths;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use zeroize::Zeroizing;

const KEK_ID_LABEL: &str = "warden.kek.id.v1";
const KEK_CHECK_LABEL: &str = "warden.kek.check.v1";
/// Meta key under which the seal configuration is stored.
pub const SEAL_META_KEY: &str = "seal";
/// Prefix of a printed unseal share.
const SHARE_PREFIX: &str = "ws1-";
pub const DEFAULT_CREDENTIAL_NAME: &str = "warden-kek";

/// The loaded key-encryption key with its public identifier.
#[derive(Debug)]
pub struct Kek {
    key: Key256,
    id: String,
}

impl Kek {
    pub fn from_key(key: Key256) -> Kek {
        let mut id = key.fingerprint(KEK_ID_LABEL);
        id.truncate(16);
        Kek { key, id }
    }
    pub fn key(&self) -> &Key256 {
        &self.key
    }
    /// Short public identifier (HMAC-derived; reveals nothing about the key).
    pub fn id(&self) -> &str {
        &self.id
    }
    pub fn check_value(&self) -> String {
        self.key.fingerprint(KEK_CHECK_LABEL)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum KekSource {
    File,
    Shamir,
    SystemdCredential,
}

impl std::str::FromStr for KekSource {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "file" => Ok(KekSource::File),
            "shamir" => Ok(KekSource::Shamir),
            "systemd-credential" => Ok(KekSource::SystemdCredential),
            _ => Err(format!(
                "unknown KEK source {s:?}: use file, shamir or systemd-credential"
            )),
        }
    }
}

impl std::fmt::Display for KekSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            KekSource::File => "file",
            KekSource::Shamir => "shamir",
            KekSource::SystemdCredential => "systemd-credential",
        })
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ShamirParams {
    pub shares: u8,
    pub threshold: u8,
    /// SHA-256 of each share's bytes, in share order.
    pub share_hashes: Vec<String>,
}

/// What the store records about its KEK. Holds no key material.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct SealConfig {
    pub format: u32,
    pub source: KekSource,
    pub kek_id: String,
    pub kek_check: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credential_name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shamir: Option<ShamirParams>,
    pub created_at: String,
}

impl SealConfig {
    pub fn to_json(&self) -> Result<String> {
        serde_json::to_string(self).map_err(|e| Error::internal(format!("seal config: {e}")))
    }
    pub fn from_json(s: &str) -> Result<SealConfig> {
        serde_json::from_str(s).map_err(|e| {
            Error::integrity(format!(
                "the store's seal configuration is unreadable ({e}): the store file is damaged"
            ))
        })
    }
    /// Checks that `kek` is this store's master key (`origin` names where it
    /// came from in the error).
    pub fn verify(&self, kek: &Kek, origin: &str) -> Result<()> {
        if kek
            .key()
            .matches_fingerprint(KEK_CHECK_LABEL, &self.kek_check)
        {
            Ok(())
        } else {
            Err(Error::integrity(format!(
                "the master key from {origin} does not match this store (key check failed; the store expects key id {}): it belongs to another installation or was altered",
                self.kek_id
            )))
        }
    }
}

/// How to create a new KEK (at init or rotation).
#[derive(Debug, Clone)]
pub struct KekPlan {
    pub source: KekSource,
    pub shares: u8,
    pub threshold: u8,
    pub credential_name: String,
}

/// A freshly created KEK, its seal record, and (for `shamir`) the shares to hand
/// out. The caller writes the key file (for `file`) via [`write_key_file`].
pub struct NewKek {
    pub kek: Kek,
    pub seal: SealConfig,
    pub shares: Vec<Zeroizing<String>>,
}

pub fn key_file_path(data_dir: &Path) -> PathBuf {
    data_dir.join(paths::KEY_FILE)
}

fn next_key_file_path(data_dir: &Path) -> PathBuf {
    data_dir.join(format!("{}.next", paths::KEY_FILE))
}

/// Creates a KEK according to `plan`. For `systemd-credential` the key is not
/// generated but read from the credential, which the operator provisions.
pub fn create_kek(plan: &KekPlan) -> Result<NewKek> {
    let (key, shares, shamir, credential_name) = match plan.source {
        KekSource::File => (Key256::generate()?, Vec::new(), None, None),
        KekSource::SystemdCredential => (
            read_systemd_credential(&plan.credential_name)?,
            Vec::new(),
            None,
            Some(plan.credential_name.clone()),
        ),
        KekSource::Shamir => {
            let (n, k) = (plan.shares, plan.threshold);
            if k < 2 || n < k {
                return Err(Error::usage(format!(
                    "--unseal-shares {n} --unseal-threshold {k}: need 2 <= threshold <= shares <= 255"
                )));
            }
            let key = Key256::generate()?;
            let dealer = blahaj::Sharks(k).dealer(key.as_bytes());
            let mut texts = Vec::new();
            let mut hashes = Vec::new();
            for share in dealer.take(usize::from(n)) {
                let bytes = Zeroizing::new(Vec::from(&share));
                hashes.push(sha256_hex(&bytes));
                texts.push(Zeroizing::new(format!(
                    "{SHARE_PREFIX}{}",
                    hex::encode(&*bytes)
                )));
            }
            let params = ShamirParams {
                shares: n,
                threshold: k,
                share_hashes: hashes,
            };
            (key, texts, Some(params), None)
        }
    };
    let kek = Kek::from_key(key);
    let seal = SealConfig {
        format: 1,
        source: plan.source,
        kek_id: kek.id().to_string(),
        kek_check: kek.check_value(),
        credential_name,
        shamir,
        created_at: crate::timefmt::now_rfc3339(),
    };
    Ok(NewKek { kek, seal, shares })
}

/// Writes the key file for a `file` KEK: to `master.key` when `staged` is false,
/// to `master.key.next` (promoted by [`promote_staged_key_file`]) during rotation.
pub fn write_key_file(data_dir: &Path, kek: &Kek, staged: bool) -> Result<PathBuf> {
    let path = if staged {
        next_key_file_path(data_dir)
    } else {
        key_file_path(data_dir)
    };
    if staged && path.exists() {
        std::fs::remove_file(&path).map_err(|e| Error::io("cannot remove stale", &path, &e))?;
    }
    let mut text = kek.key().to_hex();
    text.push('\n');
    paths::write_private_file_new(&path, text.as_bytes())?;
    Ok(path)
}

/// Moves `master.key.next` over `master.key` once the store has committed the
/// rotation.
pub fn promote_staged_key_file(data_dir: &Path) -> Result<()> {
    let next = next_key_file_path(data_dir);
    let cur = key_file_path(data_dir);
    std::fs::rename(&next, &cur).map_err(|e| Error::io("cannot install new key file", &cur, &e))
}

/// The KEK as far as it can be loaded without human help.
pub enum KekState {
    Unsealed(Kek),
    /// Shamir: waiting for shares.
    Sealed(Unsealer),
}

/// Loads the KEK described by `seal`: from the key file or the systemd
/// credential (checked against the store), or a sealed [`Unsealer`].
pub fn load_kek(data_dir: &Path, seal: &SealConfig) -> Result<KekState> {
    match seal.source {
        KekSource::File => load_key_file(data_dir, seal).map(KekState::Unsealed),
        KekSource::SystemdCredential => {
            let name = seal
                .credential_name
                .as_deref()
                .unwrap_or(DEFAULT_CREDENTIAL_NAME);
            let kek = Kek::from_key(read_systemd_credential(name)?);
            seal.verify(&kek, &format!("systemd credential {name:?}"))?;
            Ok(KekState::Unsealed(kek))
        }
        KekSource::Shamir => Ok(KekState::Sealed(Unsealer::new(seal)?)),
    }
}

fn load_key_file(data_dir: &Path, seal: &SealConfig) -> Result<Kek> {
    let path = key_file_path(data_dir);
    let next = next_key_file_path(data_dir);
    // A rotation that committed the store but crashed before renaming the new
    // key file leaves `master.key.next` as the matching key: finish the rename.
    if next.exists() {
        if let Ok(kek) = read_key_file(&next) {
            if seal.verify(&kek, "").is_ok() {
                promote_staged_key_file(data_dir)?;
                return Ok(kek);
            }
        }
    }
    if !path.exists() {
        return Err(Error::usage(format!(
            "master key file {} is missing: restore it from your backup (the store cannot be decrypted without it)",
            path.display()
        )));
    }
    let kek = read_key_file(&path)?;
    seal.verify(&kek, &format!("key file {}", path.display()))?;
    Ok(kek)
}

fn read_key_file(path: &Path) -> Result<Kek> {
    paths::check_private_file(path)?;
    let text = Zeroizing::new(
        std::fs::read_to_string(path).map_err(|e| Error::io("cannot read key file", path, &e))?,
    );
    let key = Key256::from_hex(&text).ok_or_else(|| {
        Error::integrity(format!(
            "key file {} does not hold a 256-bit key (64 hex characters)",
            path.display()
        ))
    })?;
    Ok(Kek::from_key(key))
}

fn read_systemd_credential(name: &str) -> Result<Key256> {
    let Some(dir) = std::env::var_os("CREDENTIALS_DIRECTORY") else {
        return Err(Error::usage(format!(
            "KEK source systemd-credential: $CREDENTIALS_DIRECTORY is not set. Run warden under systemd with `LoadCredentialEncrypted={name}:/etc/credstore.encrypted/{name}` (create it with `head -c 32 /dev/urandom | systemd-creds encrypt --name={name} - /etc/credstore.encrypted/{name}`)"
        )));
    };
    let path = PathBuf::from(dir).join(name);
    let raw = Zeroizing::new(
        std::fs::read(&path).map_err(|e| Error::io("cannot read systemd credential", &path, &e))?,
    );
    if let Some(k) = Key256::from_slice(&raw) {
        return Ok(k);
    }
    std::str::from_utf8(&raw)
        .ok()
        .and_then(Key256::from_hex)
        .ok_or_else(|| {
            Error::usage(format!(
                "systemd credential {} must hold 32 raw bytes or 64 hex characters",
                path.display()
            ))
        })
}

/// Progress of an unseal.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct UnsealProgress {
    pub provided: u8,
    pub threshold: u8,
    pub unsealed: bool,
}

/// Collects Shamir shares until the threshold is reached.
pub struct Unsealer {
    params: ShamirParams,
    seal: SealConfig,
    shares: Vec<blahaj::Share>,
    seen: Vec<usize>,
}

impl Unsealer {
    pub fn new(seal: &SealConfig) -> Result<Self> {
        let params = seal.shamir.clone().ok_or_else(|| {
            Error::integrity("seal configuration says shamir but has no share parameters")
        })?;
        Ok(Unsealer {
            params,
            seal: seal.clone(),
            shares: Vec::new(),
            seen: Vec::new(),
        })
    }

    pub fn progress(&self) -> UnsealProgress {
        UnsealProgress {
            provided: u8::try_from(self.shares.len()).unwrap_or(u8::MAX),
            threshold: self.params.threshold,
            unsealed: false,
        }
    }

    /// Accepts one share (text as printed by `warden init`). Returns the KEK
    /// once the threshold is reached.
    pub fn submit(&mut self, text: &str) -> Result<(UnsealProgress, Option<Kek>)> {
        let text = text.trim();
        let hex_part = text.strip_prefix(SHARE_PREFIX).ok_or_else(|| {
            Error::usage(format!(
                "share rejected: an unseal share starts with {SHARE_PREFIX:?} (as printed by `warden init --unseal-shares`)"
            ))
        })?;
        let bytes = Zeroizing::new(
            hex::decode(hex_part)
                .map_err(|_| Error::usage("share rejected: it is not valid hex (mistyped?)"))?,
        );
        let hash = sha256_hex(&bytes);
        let index = self
            .params
            .share_hashes
            .iter()
            .position(|h| *h == hash)
            .ok_or_else(|| {
                Error::denied(
                    "share rejected: it is not one of this store's unseal shares (mistyped, or from another installation or an older key)",
                )
            })?;
        if self.seen.contains(&index) {
            return Err(Error::usage(format!(
                "share rejected: share {} was already provided; {} of {} so far",
                index + 1,
                self.shares.len(),
                self.params.threshold
            )));
        }
        let share = blahaj::Share::try_from(bytes.as_slice())
            .map_err(|e| Error::usage(format!("share rejected: {e}")))?;
        self.shares.push(share);
        self.seen.push(index);
        let mut progress = self.progress();
        if progress.provided < self.params.threshold {
            return Ok((progress, None));
        }
        let secret = Zeroizing::new(
            blahaj::Sharks(self.params.threshold)
                .recover(self.shares.iter())
                .map_err(|e| Error::internal(format!("share recovery failed: {e}")))?,
        );
        self.shares.clear();
        self.seen.clear();
        let key = Key256::from_slice(&secret)
            .ok_or_else(|| Error::integrity("recovered key has the wrong length"))?;
        let kek = Kek::from_key(key);
        self.seal.verify(&kek, "the unseal shares")?;
        progress.unsealed = true;
        Ok((progress, Some(kek)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shamir_plan(n: u8, k: u8) -> KekPlan {
        KekPlan {
            source: KekSource::Shamir,
            shares: n,
            threshold: k,
            credential_name: DEFAULT_CREDENTIAL_NAME.into(),
        }
    }

    #[test]
    fn k_shares_unseal_k_minus_1_do_not() {
        let new = create_kek(&shamir_plan(5, 3)).unwrap();
        assert_eq!(new.shares.len(), 5);
        let mut u = Unsealer::new(&new.seal).unwrap();
        let (p, k) = u.submit(&new.shares[4]).unwrap();
        assert!(k.is_none());
        assert_eq!((p.provided, p.threshold), (1, 3));
        let (p, k) = u.submit(&new.shares[1]).unwrap();
        assert!(k.is_none() && p.provided == 2);
        let (p, k) = u.submit(&new.shares[2]).unwrap();
        assert!(p.unsealed);
        assert_eq!(k.unwrap().id(), new.kek.id());
    }

    #[test]
    fn wrong_duplicate_and_foreign_shares_are_rejected() {
        let new = create_kek(&shamir_plan(3, 2)).unwrap();
        let other = create_kek(&shamir_plan(3, 2)).unwrap();
        let mut u = Unsealer::new(&new.seal).unwrap();
        let e = u.submit(&other.shares[0]).unwrap_err();
        assert!(e.message.contains("not one of this store's"), "{e}");
        let e = u.submit("hello").unwrap_err();
        assert!(e.message.contains("starts with"), "{e}");
        let e = u.submit("ws1-zz").unwrap_err();
        assert!(e.message.contains("hex"), "{e}");
        // One flipped hex digit: rejected, not silently combined.
        let mut typo = new.shares[0].to_string();
        let last = typo.pop().unwrap();
        typo.push(if last == '0' { '1' } else { '0' });
        assert!(u.submit(&typo).is_err());
        u.submit(&new.shares[0]).unwrap();
        let e = u.submit(&new.shares[0]).unwrap_err();
        assert!(e.message.contains("already provided"), "{e}");
        assert_eq!(u.progress().provided, 1);
        let (_, k) = u.submit(&new.shares[2]).unwrap();
        assert!(k.is_some());
    }

    #[test]
    fn bad_thresholds_are_usage_errors() {
        assert!(create_kek(&shamir_plan(2, 3)).is_err());
        assert!(create_kek(&shamir_plan(3, 1)).is_err());
    }

    #[test]
    fn seal_config_roundtrips_without_key_material() {
        let new = create_kek(&shamir_plan(3, 2)).unwrap();
        let json = new.seal.to_json().unwrap();
        assert_eq!(SealConfig::from_json(&json).unwrap(), new.seal);
        assert!(!json.contains(&*new.kek.key().to_hex()));
        for s in &new.shares {
            assert!(!json.contains(s.as_str()));
        }
    }
}
