//! The `KeyStore` trait: every key operation the KES API needs, and its two backends.
//!
//! Owns key lifecycle and the sealing of data keys. Knows nothing of HTTP, identities or
//! policy: callers pass a validated [`KeyName`] and get a [`KeystoreError`] that the server
//! maps to the wire in one place.
//!
//! - [`pkcs11`]: master keys inside a PKCS#11 token (a software token in tests, real HSMs in production).
//! - [`soft`]: the embedded keystore for `--dev` and machines without an HSM, in memory or in a
//!   directory of KEK-wrapped files; same schemes, byte-identical ciphertexts.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use time::OffsetDateTime;

use crate::crypto::kes::Algorithm;
use crate::name::KeyName;
use crate::secret::{Key32, SecretBytes};

pub mod pkcs11;
pub mod settings;
pub mod soft;
pub mod usage;

/// How a key seals data keys; fixed when the key is made (docs/FORMAT.md §1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Scheme {
    /// AES-256-GCM on the device; kesh's native format. Default for created keys.
    Gcm,
    /// AES key wrap with padding on the device, for HSMs without on-device GCM.
    Kwp,
    /// KES's exact format: per-message key = HMAC-SHA256(master, iv), AEAD in the host.
    Kes,
}

impl Scheme {
    /// The name the config file and key metadata use (`gcm`, `kwp`, `kes`).
    pub fn as_str(self) -> &'static str {
        match self {
            Scheme::Gcm => "gcm",
            Scheme::Kwp => "kwp",
            Scheme::Kes => "kes",
        }
    }

    /// The scheme named `s`, if any ([`Scheme::as_str`]'s inverse).
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "gcm" => Some(Scheme::Gcm),
            "kwp" => Some(Scheme::Kwp),
            "kes" => Some(Scheme::Kes),
            _ => None,
        }
    }
}

impl fmt::Display for Scheme {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What `describe` reports about a key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyInfo {
    /// The key's name.
    pub name: KeyName,
    /// How it seals data keys.
    pub scheme: Scheme,
    /// The KES algorithm it reports (`AES256` for every HSM key).
    pub algorithm: Algorithm,
    /// When it was created or imported, to the microsecond.
    pub created_at: OffsetDateTime,
    /// The identity that created the key; empty when unknown (legacy keys, skip_auth routes).
    pub created_by: String,
    /// The key version that seals: the newest. Keys start at 1; each rotation adds one.
    pub version: u32,
}

/// Whether a key version seals or only unseals.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VersionState {
    /// The newest version: new ciphertexts are sealed with it.
    Sealing,
    /// An older version: it opens its ciphertexts and seals nothing.
    Active,
}

impl VersionState {
    /// The state as the versions listing names it.
    pub fn as_str(self) -> &'static str {
        match self {
            VersionState::Sealing => "sealing",
            VersionState::Active => "active",
        }
    }
}

/// One version of a key, as `versions` lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VersionInfo {
    /// The version's number, from 1.
    pub version: u32,
    /// When the version was made.
    pub created_at: OffsetDateTime,
    /// Whether it seals.
    pub state: VersionState,
    /// Seals and unseals by this process since it started ([`usage`]).
    pub seals: u64,
    /// Unseals, likewise.
    pub unseals: u64,
    /// This process's last seal or unseal with the version, since it started.
    pub last_used: Option<OffsetDateTime>,
}

/// The outcome of a scheduled rotation ([`KeyStore::rotate_if_due`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScheduledRotation {
    /// This call made the version.
    Rotated(u32),
    /// The newest version is younger than the period, or another instance just rotated.
    NotDue,
}

impl From<Option<u32>> for ScheduledRotation {
    /// A backend's "version made, if any".
    fn from(made: Option<u32>) -> Self {
        made.map_or(ScheduledRotation::NotDue, ScheduledRotation::Rotated)
    }
}

/// How long a version stays "sealing" after a newer one is made, for [`KeyStore::destroy_version`]:
/// other instances may not have seen the new version yet (they do within about a second).
pub const SEALING_GRACE: Duration = Duration::from_secs(3);

/// Who and when, recorded with a new key.
#[derive(Debug, Clone)]
pub struct Provenance {
    /// When the key was made.
    pub created_at: OffsetDateTime,
    /// The identity that made it; empty when unknown.
    pub created_by: String,
}

impl Provenance {
    /// Now, truncated to whole microseconds, by `created_by`.
    pub fn now(created_by: impl Into<String>) -> Self {
        // Whole microseconds: what every backend can store and return unchanged.
        let now = OffsetDateTime::now_utc();
        let created_at = now
            .replace_nanosecond(now.nanosecond() / 1000 * 1000)
            .unwrap_or(now);
        Provenance {
            created_at,
            created_by: created_by.into(),
        }
    }
}

/// The HMAC key that goes with an imported key.
pub enum HmacKeySource {
    /// Draw a fresh one (what KES does on `/v1/key/import`).
    Generate,
    /// Keep the one a migrated KES key already had, so `/v1/key/hmac` answers as before.
    Given(Key32),
    /// Legacy KES keys had none; `/v1/key/hmac` then answers 409.
    None,
}

/// Key material brought in from outside: `/v1/key/import`, `kesh migrate`, test vectors.
pub struct ImportKey {
    /// The 256-bit key material (zeroized on drop).
    pub key: Key32,
    /// The KES algorithm it had.
    pub algorithm: Algorithm,
    /// How the imported key will seal data keys (`kes` for KES keys, so their ciphertexts keep
    /// decrypting).
    pub scheme: Scheme,
    /// Its HMAC key.
    pub hmac: HmacKeySource,
    /// Who and when, as recorded with the key.
    pub provenance: Provenance,
}

impl fmt::Debug for ImportKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ImportKey")
            .field("algorithm", &self.algorithm)
            .field("scheme", &self.scheme)
            .field("provenance", &self.provenance)
            .finish_non_exhaustive()
    }
}

/// A freshly generated data key: the plaintext for the caller, the ciphertext to store.
pub struct DataKey {
    /// The 32-byte data key (zeroized on drop).
    pub plaintext: Key32,
    /// The data key sealed under the master key, in the key's scheme's format (docs/FORMAT.md).
    pub ciphertext: Vec<u8>,
}

impl fmt::Debug for DataKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DataKey")
            .field("ciphertext_len", &self.ciphertext.len())
            .finish_non_exhaustive()
    }
}

/// Errors of the keystore layer. The variant is all the server reads (it maps each to its KES
/// status and message in `server::error`); the [`BackendError`] inside says why, typed, for
/// logs and the CLI. Messages never carry secrets.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeystoreError {
    /// A key of that name exists (create, import).
    #[error("key already exists")]
    KeyExists,
    /// No key of that name exists, or it was deleted while the call ran.
    #[error("key does not exist")]
    KeyNotFound,
    /// The ciphertext or its context does not verify under the key.
    #[error("ciphertext is not authentic")]
    NotAuthentic,
    /// The key has no HMAC key (legacy KES keys).
    #[error("key does not support HMAC")]
    HmacUnsupported,
    /// The backend cannot hold this kind of key (ChaCha20 keys on an HSM).
    #[error("algorithm '{0}' is not supported by this keystore")]
    AlgorithmUnsupported(&'static str),
    /// The operation or the configuration does not fit the key's scheme or the backend's limits.
    #[error("invalid input: {0}")]
    InvalidInput(#[source] BackendError),
    /// The device is down or being recovered; requests fail fast until it is back.
    #[error("keystore is unreachable: {0}")]
    Unreachable(#[source] BackendError),
    /// No HSM session became free within the configured wait.
    #[error("keystore is busy: no session free within {0:?}")]
    Busy(Duration),
    /// Any other backend failure (a PKCS#11 return code, an I/O error).
    #[error("keystore error: {0}")]
    Backend(#[source] BackendError),
    /// The key has no such version (never made, or destroyed).
    #[error("key version does not exist")]
    VersionNotFound,
    /// A version that must not be destroyed now; the message says why.
    #[error("{0}")]
    VersionRefused(&'static str),
    /// The backend does not offer this operation.
    #[error("{0} is not supported by this keystore")]
    Unsupported(&'static str),
}

impl KeystoreError {
    /// The variant as a metric label (`kesh_keystore_errors_total{kind=...}`).
    pub fn kind(&self) -> &'static str {
        match self {
            KeystoreError::KeyExists => "key_exists",
            KeystoreError::KeyNotFound => "key_not_found",
            KeystoreError::NotAuthentic => "not_authentic",
            KeystoreError::HmacUnsupported => "hmac_unsupported",
            KeystoreError::AlgorithmUnsupported(_) => "algorithm_unsupported",
            KeystoreError::InvalidInput(_) => "invalid_input",
            KeystoreError::Unreachable(_) => "unreachable",
            KeystoreError::Busy(_) => "busy",
            KeystoreError::Backend(_) => "backend",
            KeystoreError::VersionNotFound => "version_not_found",
            KeystoreError::VersionRefused(_) => "version_refused",
            KeystoreError::Unsupported(_) => "unsupported",
        }
    }
}

/// Refusal message of [`KeyStore::destroy_version`] for the sealing version.
pub const REFUSE_SEALING: &str =
    "key version seals new data: rotate the key first (and wait a few seconds)";
/// Refusal message of [`KeyStore::destroy_version`] for version 1.
pub const REFUSE_FIRST: &str =
    "key version 1 holds the key's identity and HMAC key and cannot be destroyed; delete the key instead";

/// Checks a destroy of `version` against the key's versions `(number, created_at)`, sorted.
pub fn check_destroy(versions: &[(u32, OffsetDateTime)], version: u32) -> Result<()> {
    if !versions.iter().any(|(v, _)| *v == version) {
        return Err(KeystoreError::VersionNotFound);
    }
    if version == 1 {
        return Err(KeystoreError::VersionRefused(REFUSE_FIRST));
    }
    // A version is sealing while it is the newest, and for SEALING_GRACE after a newer one
    // appeared: other instances may still seal with it until they see the newer one.
    let newer = versions.iter().find(|(v, _)| *v > version);
    let sealing = match newer {
        None => true,
        Some((_, at)) => OffsetDateTime::now_utc() - *at < SEALING_GRACE,
    };
    if sealing {
        return Err(KeystoreError::VersionRefused(REFUSE_SEALING));
    }
    Ok(())
}

impl From<crate::crypto::NotAuthentic> for KeystoreError {
    fn from(_: crate::crypto::NotAuthentic) -> Self {
        KeystoreError::NotAuthentic
    }
}

/// Why a backend failed: each backend's own error, wrapped whole. Cheap to clone.
#[derive(Debug, Clone, thiserror::Error)]
pub enum BackendError {
    #[error(transparent)]
    /// The pkcs11 backend's.
    Pkcs11(#[from] pkcs11::Pkcs11Error),
    #[error(transparent)]
    /// The soft keystore's.
    Soft(#[from] Arc<soft::SoftError>),
    /// The host's random number generator (the soft keystore, `kesh migrate`'s checks).
    #[error("random number generator failed: {0}")]
    Random(getrandom::Error),
    /// From a keystore or step outside the two backends (a test double, `kesh migrate`).
    #[error(transparent)]
    Other(Arc<dyn std::error::Error + Send + Sync>),
}

impl BackendError {
    /// Wraps an error from outside the two backends.
    pub fn other(e: impl std::error::Error + Send + Sync + 'static) -> Self {
        BackendError::Other(Arc::new(e))
    }
}

impl From<soft::SoftError> for BackendError {
    fn from(e: soft::SoftError) -> Self {
        BackendError::Soft(Arc::new(e))
    }
}

/// For keystores that only have words for what went wrong (test doubles).
impl From<&str> for BackendError {
    fn from(why: &str) -> Self {
        BackendError::Other(Arc::from(Box::<dyn std::error::Error + Send + Sync>::from(
            why,
        )))
    }
}

/// Equal when they say the same: backend errors wrap I/O and library errors that have no
/// equality of their own, and tests compare [`KeystoreError`]s whole.
impl PartialEq for BackendError {
    fn eq(&self, other: &Self) -> bool {
        self.to_string() == other.to_string()
    }
}

impl Eq for BackendError {}

impl settings::KeystoreConfig {
    /// Opens the configured keystore.
    pub async fn open(&self) -> Result<Arc<dyn KeyStore>> {
        Ok(match self {
            settings::KeystoreConfig::Pkcs11(cfg) => {
                Arc::new(pkcs11::Pkcs11KeyStore::open(cfg.clone()).await?)
            }
            settings::KeystoreConfig::Soft(cfg) => {
                let scheme = cfg.scheme.unwrap_or(Scheme::Gcm);
                let store = match &cfg.dir {
                    Some(dir) => soft::SoftKeyStore::open_dir(&dir.path, &dir.kek_file)?,
                    None => soft::SoftKeyStore::in_memory(),
                };
                Arc::new(store.with_scheme(scheme))
            }
        })
    }
}

/// The keystore layer's result.
pub type Result<T, E = KeystoreError> = std::result::Result<T, E>;

/// The state of a backend's session pool, for metrics. Counters are cumulative since start.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct PoolStats {
    /// Sessions (and worker threads) in the pool.
    pub size: usize,
    /// Calls running on them now.
    pub in_use: usize,
    /// Calls that took a session.
    pub acquired: u64,
    /// Of those, calls run on the asking runtime thread rather than an HSM worker thread
    /// (a fast local device: no thread hand-off).
    pub inline: u64,
    /// Total time those calls waited for it. (Refusals are counted by the caller, which
    /// sees every `Busy` error.)
    pub wait_seconds: f64,
    /// Total time those calls ran: the device's own time, round trips included.
    pub call_seconds: f64,
}

/// What a backend reports beside its answers, for `/v1/metrics/kesh` and `/v1/status`.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct KeystoreStats {
    /// The HSM session pool, for backends that have one.
    pub pool: Option<PoolStats>,
    /// For backends that log in: whether the device refused the PIN and the backend waits
    /// for the operator instead of trying again.
    pub login_refused: Option<bool>,
    /// For the soft keystore's directory: key files skipped as unreadable.
    pub unreadable_key_files: Option<u64>,
}

/// The key operations of the KES API.
///
/// Contract, for every backend:
///
/// - **Sharing.** Implementations are cheap to share (`Arc<dyn KeyStore>`) and safe to call
///   concurrently from any task; no method blocks the async runtime (the pkcs11 backend runs its
///   PKCS#11 calls on its own worker threads).
/// - **Names.** `name` is already validated ([`KeyName`]). "Not found" ([`KeystoreError::KeyNotFound`])
///   means no complete key of that name is visible to this instance now: never created, deleted
///   (here or by another instance sharing the token), or still being created by another instance.
///   A half-made key is never seen.
/// - **Errors.** Every failure is a [`KeystoreError`]; messages carry no key material, plaintext
///   or PIN. [`KeystoreError::Busy`] and [`KeystoreError::Unreachable`] are transient: the
///   operation did not happen and may be retried. The server maps each variant to its status and
///   message in `server::error`.
/// - **Atomicity.** Create, import and delete either happen whole or not at all, across
///   processes sharing one token (docs/FORMAT.md §6).
#[async_trait::async_trait]
pub trait KeyStore: Send + Sync + 'static {
    /// One line for banners and `/v1/status` logs, e.g. `PKCS#11 token label 'kesh' via /usr/lib/... (vendor)`.
    fn description(&self) -> String;

    /// Creates a key with the backend's default scheme and a fresh HMAC key. Not idempotent: a
    /// second create of a name fails with [`KeystoreError::KeyExists`], and of concurrent creates
    /// of one name (in any process) exactly one succeeds.
    async fn create(&self, name: &KeyName, provenance: Provenance) -> Result<()>;

    /// Stores outside key material under `name`, as [`KeyStore::create`] does (same
    /// [`KeystoreError::KeyExists`] rule). A backend that cannot hold the algorithm answers
    /// [`KeystoreError::AlgorithmUnsupported`] (ChaCha20 on an HSM).
    async fn import(&self, name: &KeyName, key: ImportKey) -> Result<()>;

    /// The key's metadata; [`KeystoreError::KeyNotFound`] if it does not exist.
    async fn describe(&self, name: &KeyName) -> Result<KeyInfo>;

    /// Names starting with `prefix` (empty: all), sorted bytewise. Never fails for an empty
    /// result. The pkcs11 backend answers from its index, which follows other instances within
    /// the change-marker poll.
    async fn list(&self, prefix: &str) -> Result<Vec<KeyName>>;

    /// Removes the key and its HMAC key. Not idempotent: deleting a missing key is
    /// [`KeystoreError::KeyNotFound`]. Ciphertexts sealed under it can no longer be opened.
    async fn delete(&self, name: &KeyName) -> Result<()>;

    /// Draws a 32-byte DEK and seals it under `name` with `context` bound as associated data.
    async fn generate(&self, name: &KeyName, context: &[u8]) -> Result<DataKey>;

    /// Seals `plaintext` under `name` with `context` bound, in the key's scheme's format.
    async fn encrypt(&self, name: &KeyName, plaintext: &[u8], context: &[u8]) -> Result<Vec<u8>>;

    /// Opens a ciphertext made by [`KeyStore::generate`] or [`KeyStore::encrypt`] (or by KES, for
    /// `kes` keys). A wrong key, context or tampered ciphertext is
    /// [`KeystoreError::NotAuthentic`]; one whose format the key's scheme cannot parse may be
    /// [`KeystoreError::InvalidInput`].
    async fn decrypt(
        &self,
        name: &KeyName,
        ciphertext: &[u8],
        context: &[u8],
    ) -> Result<SecretBytes>;

    /// HMAC-SHA256 of `message` under the key's separate HMAC key;
    /// [`KeystoreError::HmacUnsupported`] when the key has none. Deterministic per key.
    async fn hmac(&self, name: &KeyName, message: &[u8]) -> Result<[u8; 32]>;

    /// Probes the backend (one cheap call to the device, or a look at the key directory);
    /// returns how long the probe took.
    async fn status(&self) -> Result<Duration>;

    /// The operator reloaded the configuration (SIGHUP) and it names this PIN. A backend that
    /// stopped logging in because the device refused its PIN makes exactly one attempt with
    /// it (an error says it failed); any other keeps it for its next login. Default: unused.
    async fn reload_pin(&self, _pin: crate::secret::Pin) -> Result<()> {
        Ok(())
    }

    /// Pool, login and storage figures; empty by default.
    fn stats(&self) -> KeystoreStats {
        KeystoreStats::default()
    }

    /// Makes a new version of the key, which seals from now on; older versions keep
    /// unsealing. Concurrent rotations (in any process) each make their own version.
    async fn rotate(&self, _name: &KeyName, _provenance: Provenance) -> Result<u32> {
        Err(KeystoreError::Unsupported("key rotation"))
    }

    /// Makes version N+1 only if the newest version N is older than `period` and still the
    /// newest when the new one commits: across processes, exactly one rotation per period.
    async fn rotate_if_due(
        &self,
        _name: &KeyName,
        _period: Duration,
        _provenance: Provenance,
    ) -> Result<ScheduledRotation> {
        Err(KeystoreError::Unsupported("key rotation"))
    }

    /// The key's versions, oldest first, with this process's use of each.
    async fn versions(&self, _name: &KeyName) -> Result<Vec<VersionInfo>> {
        Err(KeystoreError::Unsupported("key versions"))
    }

    /// Destroys one old version: its ciphertexts no longer open. Refused for the sealing
    /// version and for version 1 ([`check_destroy`]).
    async fn destroy_version(&self, _name: &KeyName, _version: u32) -> Result<()> {
        Err(KeystoreError::Unsupported("key versions"))
    }

    /// Seals and unseals per key version since start, for `/v1/metrics/kesh`.
    fn version_usage(&self) -> Vec<usage::VersionUsage> {
        Vec::new()
    }
}
