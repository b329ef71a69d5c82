//! The HSM keystore: master keys inside a PKCS#11 token.
//!
//! Owns the PKCS#11 context, the session pool, the name → handle index and recovery. Knows
//! nothing of HTTP or policy. This file holds the keystore's state and its `KeyStore` face;
//! the work is in one module per concern:
//!
//! | module | owns |
//! |---|---|
//! | [`settings`], [`profile`] | the config's settings; vendor profiles, their detection and the throwaway dev and test tokens ([`ephemeral`]): the only place that names vendors |
//! | `seam` | `Inner::run` (every request's PKCS#11 calls) and recovery, login state |
//! | `index` | the name → objects index, token scans, the change-marker poll ([`changes`]) |
//! | `create` | the create protocol, imports, deletes, the host write lock ([`writelock`]) |
//! | `seal` | seal and unseal on the device per scheme, session copies ([`copies`]), one-call data functions ([`raw`]), bulk randomness ([`randomness`]) |
//! | [`device`] | one connection: initialize, find the token, log in, sessions |
//! | [`objects`] | labels, metadata and key templates |
//! | [`workers`] | where calls run: inline for a fast device, else the OS worker threads |
//! | [`probe`] | `kesh hsm probe` |
//!
//! Every cryptoki call of a request goes through `Inner::run` (in `seam.rs`), the
//! one seam: it hands the call to [`workers`], which runs it inline while the device's calls
//! take microseconds, and otherwise queues it for one OS thread per pool session (so PKCS#11
//! calls, which block for as long as the device takes, never stall the async runtime), and
//! answers `Busy` when no worker takes it within `session_wait`.
//!
//! Index: built from one scan at start, kept current on create/delete, refreshed on a miss
//! (one targeted search at a time, with a short negative cache so floods of unknown names
//! cost nothing) and on a stale handle; every name the instance learns exists or is gone
//! (a create conflict included) is in or out of it at once. Creates and deletes of other
//! instances reach it through the token's change marker ([`changes`]), read every
//! [`changes::POLL`]: a changed marker rescans the token, so listings, which read the index
//! alone, follow other instances within the poll plus one scan.
//!
//! Recovery: a device-level return code (see [`error::meaning`]) takes the device out of
//! service at once (requests fail fast with `Unreachable`), waits for in-flight calls, then
//! finalizes, re-initializes, logs in and rebuilds the index, retrying with backoff capped at
//! [`RECOVERY_BACKOFF_MAX`]. A login the token refuses ([`Pkcs11Error::PinRefused`]) is never
//! retried: HSMs lock a partition after a few bad PINs, for every application on it. kesh
//! then waits for the operator, whose reload ([`KeyStore::reload_pin`]) makes exactly one
//! attempt.

pub mod changes;
pub mod copies;
mod create;
pub mod device;
pub mod error;
mod index;
#[allow(
    unsafe_code,
    reason = "FFI: PKCS#11 3.0 message-based AEAD through C_GetInterface (cryptoki's form asks the length first: two calls)"
)]
pub mod message;
pub mod objects;
pub mod probe;
pub mod profile;
#[allow(
    unsafe_code,
    reason = "mlock of the pool of HSM random bytes: libc has no safe wrapper"
)]
pub mod randomness;
#[allow(
    unsafe_code,
    reason = "FFI: the module's own C_Encrypt/C_Decrypt through dlopen/dlsym (cryptoki has no single-call form), and the exit hook (atexit)"
)]
pub mod raw;
mod seal;
mod seam;
pub mod settings;
pub mod workers;
pub mod writelock;

pub use error::Pkcs11Error;
pub use profile::{ephemeral, Profile};
pub use settings::{IvSource, Pkcs11Config, Settings, TokenSelector};

use self::create::{NewHmac, NewKey};
use self::index::{scan, Index};

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use cryptoki::context::Pkcs11;
use cryptoki::object::AttributeType;
use zeroize::Zeroizing;

use self::device::Device;
use self::error::NextLogin;
use self::workers::{Placement, Workers};
use self::writelock::WriteLock;
use super::{
    DataKey, HmacKeySource, ImportKey, KeyInfo, KeyStore, KeystoreError, KeystoreStats, PoolStats,
    Provenance, Result, ScheduledRotation, VersionInfo,
};
use crate::crypto::kes::Algorithm;
use crate::locks::IgnorePoison;
use crate::name::KeyName;
use crate::secret::{Pin, SecretBytes};

/// A name searched for and not found is answered from memory for a while: ten times as long
/// as the search took, within these bounds. Floods of one unknown name then cost at most a
/// tenth of a worker, while on a small token a key another instance just created is found
/// after ~0.1 s rather than a fixed second.
const NEGATIVE_TTL_MIN: Duration = Duration::from_millis(100);
const NEGATIVE_TTL_MAX: Duration = Duration::from_secs(2);
/// The longest wait between two reconnection attempts of recovery.
pub const RECOVERY_BACKOFF_MAX: Duration = Duration::from_secs(2);
/// How long a create waits for a concurrent create of the same name on another instance.
const CREATE_CONTENTION_LIMIT: Duration = Duration::from_secs(5);

/// The PKCS#11 keystore. Cheap to clone.
#[derive(Clone)]
pub struct Pkcs11KeyStore {
    inner: Arc<Inner>,
}

struct Inner {
    cfg: Pkcs11Config,
    /// The config's settings over the profile's: what every other part reads.
    settings: Settings,
    ctx: Pkcs11,
    /// `None` while the device is down and being recovered.
    device: RwLock<Option<Arc<Device>>>,
    generation: AtomicU64,
    index: RwLock<Index>,
    workers: Workers,
    /// Held shared by every call on a worker, exclusively by recovery while it swaps the
    /// device, so no call is in flight while the module is finalized.
    calls: RwLock<()>,
    recovering: AtomicBool,
    /// The PIN for the next login: the configured one until a reload brings another.
    pin: Mutex<Pin>,
    /// Set when the token refused the PIN: no login is attempted until a reload
    /// ([`KeyStore::reload_pin`]).
    login_refused: AtomicBool,
    /// Why the device is out of service, for requests refused meanwhile.
    last_failure: Mutex<Option<Pkcs11Error>>,
    /// Serialises index misses and remembers recent ones, each until its expiry.
    misses: tokio::sync::Mutex<HashMap<KeyName, Instant>>,
    token_description: String,
    write_lock: Option<WriteLock>,
    /// Token searches made (index misses and full scans): requests for indexed keys make none.
    searches: AtomicU64,
    /// The change marker as this instance last knew it to match its index ([`changes`]);
    /// `None` forces a rescan at the next poll.
    marker_seen: Mutex<Option<changes::Stamp>>,
    /// The markers the last poll found, read by handle ([`changes::Known`]); only the poll,
    /// one at a time, touches it.
    markers_known: Mutex<Option<changes::Known>>,
    /// This instance created or deleted a key since it last replaced the marker.
    marker_due: AtomicBool,
    /// The HSM's random bytes for DEKs and IVs, drawn in bulk ([`randomness`]).
    randomness: randomness::RandomPool,
    /// When each key's versions were last looked up on the token for a version the index
    /// lacked (`Inner::with_version`).
    version_lookups: Mutex<HashMap<KeyName, Instant>>,
    /// Seals and unseals per key version since start.
    usage: super::usage::Usage,
}

impl fmt::Debug for Pkcs11KeyStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Pkcs11KeyStore")
            .field("token", &self.inner.cfg.token)
            .finish_non_exhaustive()
    }
}

impl Pkcs11KeyStore {
    /// Loads the module, finds the token, logs in and builds the index.
    pub async fn open(cfg: Pkcs11Config) -> Result<Self> {
        let started = Instant::now();
        let _writes = TOKEN_WRITES.lock().await;
        let opened = tokio::task::spawn_blocking(move || -> Result<_, Pkcs11Error> {
            let ctx = Pkcs11::new(&cfg.module).map_err(|e| Pkcs11Error::Load {
                path: cfg.module.clone(),
                source: Arc::new(e),
            })?;
            device::initialize(&ctx)?;
            raw::CallGuard::install_exit_hook(&cfg.module);
            let settings = Settings::resolve(&cfg, device::detect_profile(&ctx, &cfg.token));
            let device =
                Device::connect(&ctx, &cfg, &settings, &cfg.pin, 0).map_err(|e| match e {
                    Pkcs11Error::PinRefused { rv, .. } => Pkcs11Error::PinRefused {
                        rv,
                        next: NextLogin::Never,
                    },
                    other => other,
                })?;
            // A server whose creates would all fail does not start.
            device
                .offers(settings.scheme)
                .map_err(|_| Pkcs11Error::ConfiguredSchemeNotOffered(settings.scheme))?;
            let info = ctx.get_library_info().ok();
            let token_description = format!(
                "PKCS#11 token {} via {}{}",
                cfg.token,
                cfg.module.display(),
                info.map(|i| format!(" ({})", i.manufacturer_id().trim_end()))
                    .unwrap_or_default()
            );
            let session = device.checkout(&ctx)?;
            // Read before the scan: a change after it shows as a new marker.
            let stamp = changes::read(&session, &cfg.prefix)?;
            let keys = scan(&session, &cfg.prefix, 0)?;
            device.checkin(session);
            Ok((ctx, cfg, settings, device, keys, stamp, token_description))
        })
        .await
        .map_err(|e| Pkcs11Error::Join(Arc::new(e)))?
        .map_err(opening)?;
        let (ctx, cfg, settings, device, keys, stamp, token_description) = opened;
        let write_lock = match &settings.write_lock {
            Some(path) => Some(
                WriteLock::open(path).map_err(|e| Pkcs11Error::WriteLockOpen {
                    path: path.clone(),
                    source: Arc::new(e),
                })?,
            ),
            None => None,
        };
        let workers =
            Workers::start(settings.sessions).map_err(|e| Pkcs11Error::Workers(Arc::new(e)))?;
        tracing::info!(
            keys = keys.len(),
            elapsed_ms = started.elapsed().as_millis() as u64,
            sessions = settings.sessions,
            profile = settings.profile.name,
            profile_from = if settings.profile_configured { "config" } else { "detected" },
            scheme = %settings.scheme,
            iv = %settings.iv,
            session_keys = settings.session_keys,
            aead = if device.message.is_some() { "message-based (PKCS#11 3.0, one call)" } else { "C_EncryptInit/C_Encrypt (two calls)" },
            write_lock = %write_lock
                .as_ref()
                .map_or("none".into(), |l| l.path().display().to_string()),
            "pkcs11 keystore ready"
        );
        let pin = Mutex::new(cfg.pin.clone());
        let inner = Arc::new(Inner {
            workers,
            calls: RwLock::new(()),
            cfg,
            settings,
            ctx,
            device: RwLock::new(Some(Arc::new(device))),
            generation: AtomicU64::new(0),
            index: RwLock::new(Index::scanned(keys)),
            recovering: AtomicBool::new(false),
            pin,
            login_refused: AtomicBool::new(false),
            last_failure: Mutex::new(None),
            misses: tokio::sync::Mutex::new(HashMap::new()),
            token_description,
            write_lock,
            searches: AtomicU64::new(0),
            marker_seen: Mutex::new(Some(stamp)),
            markers_known: Mutex::new(None),
            marker_due: AtomicBool::new(false),
            randomness: randomness::RandomPool::new(),
            version_lookups: Mutex::new(HashMap::new()),
            usage: Default::default(),
        });
        tokio::spawn(Inner::watch(Arc::downgrade(&inner)));
        Ok(Pkcs11KeyStore { inner })
    }

    /// The settings in force: the config's over the configured or detected profile's.
    pub fn settings(&self) -> &Settings {
        &self.inner.settings
    }

    /// Keys currently in the index (for start-up reports and benchmarks).
    pub fn indexed_keys(&self) -> usize {
        self.inner.index.read().ignore_poison().keys.len()
    }

    /// Message-based AEAD calls (prepares, messages, finals) since the device connected;
    /// `None` when `gcm` keys seal in two calls (for tests and benchmarks).
    pub fn message_calls(&self) -> Option<(u64, u64, u64)> {
        let device = self.inner.current_device().ok()?;
        let c = device.message.as_ref()?.calls();
        let load = |n: &AtomicU64| n.load(Ordering::Relaxed);
        Some((load(&c.prepares), load(&c.messages), load(&c.finals)))
    }

    /// Searches of the token so far, targeted or full (for tests and benchmarks).
    pub fn token_searches(&self) -> u64 {
        self.inner.searches.load(Ordering::Relaxed)
    }

    /// Rebuilds the index from a full scan and returns how long it took.
    pub async fn rebuild_index(&self) -> Result<Duration> {
        let started = Instant::now();
        self.inner.rescan().await?;
        Ok(started.elapsed())
    }
}

/// At start every failure means the token cannot be used: a device code or a stale handle
/// from the first scan is not about any one request.
fn opening(e: Pkcs11Error) -> KeystoreError {
    match KeystoreError::from(e.clone()) {
        KeystoreError::Backend(_) | KeystoreError::KeyNotFound | KeystoreError::Busy(_) => {
            KeystoreError::Unreachable(e.into())
        }
        other => other,
    }
}

/// Serialises this process's token writes (create, import, delete) and full scans, across
/// every keystore instance in the process: some software tokens' object stores fail
/// (CKR_GENERAL_ERROR, half-read objects) when one process's threads create objects and scan
/// concurrently, and
/// writes are rare enough that one at a time costs nothing. Other processes are handled by
/// the on-token protocol in `create_on_token`.
static TOKEN_WRITES: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Keeps this process's token searches apart from its token writes, on the threads that make
/// the calls. SoftHSM re-reads every object's file during `C_FindObjectsInit` and its file locks
/// only keep processes apart, not threads: a search beside a create read the new object's file
/// half-written, dropped its attributes, and `C_GenerateKey` then failed with
/// `CKR_TEMPLATE_INCONSISTENT` (seen with two instances and 8 clients creating keys).
/// [`TOKEN_WRITES`] cannot cover request-path searches (a miss) without stalling them behind
/// every create's whole protocol; this lock holds only while calls run.
static TOKEN_OBJECTS: std::sync::RwLock<()> = std::sync::RwLock::new(());

#[async_trait::async_trait]
impl KeyStore for Pkcs11KeyStore {
    fn description(&self) -> String {
        self.inner.token_description.clone()
    }

    async fn create(&self, name: &KeyName, provenance: Provenance) -> Result<()> {
        let spec = NewKey {
            scheme: self.inner.settings.scheme,
            algorithm: Algorithm::Aes256,
            material: None,
            hmac: NewHmac::Generate,
            provenance,
        };
        self.inner.create_key(name, spec).await
    }

    async fn import(&self, name: &KeyName, key: ImportKey) -> Result<()> {
        if key.algorithm == Algorithm::ChaCha20 {
            // HChaCha20 has no PKCS#11 mechanism: the key would have to leave the HSM.
            return Err(KeystoreError::AlgorithmUnsupported("ChaCha20"));
        }
        let spec = NewKey {
            scheme: key.scheme,
            algorithm: key.algorithm,
            material: Some(Zeroizing::new(key.key.to_vec())),
            hmac: match key.hmac {
                HmacKeySource::Generate => NewHmac::Generate,
                HmacKeySource::Given(k) => NewHmac::Given(Zeroizing::new(k.to_vec())),
                HmacKeySource::None => NewHmac::None,
            },
            provenance: key.provenance,
        };
        self.inner.create_key(name, spec).await
    }

    async fn describe(&self, name: &KeyName) -> Result<KeyInfo> {
        // One cheap read proves the handle still names a live object, so a key deleted by
        // another instance is reported gone at once.
        self.inner
            .with_indexed_key(name, Placement::Anywhere, |s, _, key| {
                s.get_attributes(key.master, &[AttributeType::Class])?;
                Ok(key.info.clone())
            })
            .await
    }

    async fn list(&self, prefix: &str) -> Result<Vec<KeyName>> {
        // From the index alone: the change-marker poll keeps it current ([`changes`]).
        self.inner.current_device()?;
        let index = self.inner.index.read().ignore_poison();
        let mut names: Vec<KeyName> = index
            .keys
            .keys()
            .filter(|k| k.as_str().starts_with(prefix))
            .cloned()
            .collect();
        names.sort();
        Ok(names)
    }

    async fn delete(&self, name: &KeyName) -> Result<()> {
        self.inner.delete_key(name).await
    }

    async fn generate(&self, name: &KeyName, context: &[u8]) -> Result<DataKey> {
        self.inner.generate(name, context).await
    }

    async fn encrypt(&self, name: &KeyName, plaintext: &[u8], context: &[u8]) -> Result<Vec<u8>> {
        self.inner.encrypt(name, plaintext, context).await
    }

    async fn decrypt(
        &self,
        name: &KeyName,
        ciphertext: &[u8],
        context: &[u8],
    ) -> Result<SecretBytes> {
        self.inner.decrypt(name, ciphertext, context).await
    }

    async fn hmac(&self, name: &KeyName, message: &[u8]) -> Result<[u8; 32]> {
        self.inner.hmac(name, message).await
    }

    fn stats(&self) -> KeystoreStats {
        let w = self.inner.workers.stats();
        KeystoreStats {
            pool: Some(PoolStats {
                size: w.size,
                in_use: w.running,
                acquired: w.started + w.inline,
                inline: w.inline,
                wait_seconds: w.waited.as_secs_f64(),
                call_seconds: w.busy.as_secs_f64(),
            }),
            login_refused: Some(self.inner.login_refused.load(Ordering::Acquire)),
            unreadable_key_files: None,
        }
    }

    async fn reload_pin(&self, pin: Pin) -> Result<()> {
        self.inner.reload_pin(pin).await
    }

    async fn rotate(&self, name: &KeyName, provenance: Provenance) -> Result<u32> {
        self.inner
            .rotate_key(name, None, provenance)
            .await?
            .ok_or_else(|| KeystoreError::Backend("rotation made no version".into()))
    }

    async fn rotate_if_due(
        &self,
        name: &KeyName,
        period: Duration,
        provenance: Provenance,
    ) -> Result<ScheduledRotation> {
        let made = self
            .inner
            .rotate_key(name, Some(period), provenance)
            .await?;
        Ok(made.into())
    }

    async fn versions(&self, name: &KeyName) -> Result<Vec<VersionInfo>> {
        let times = self
            .inner
            .with_indexed_key(name, Placement::Anywhere, |s, _, indexed| {
                s.get_attributes(indexed.master, &[AttributeType::Class])?;
                Ok(indexed.version_times())
            })
            .await?;
        Ok(self.inner.usage.listing(name, times))
    }

    async fn destroy_version(&self, name: &KeyName, version: u32) -> Result<()> {
        self.inner.destroy_version(name, version).await
    }

    fn version_usage(&self) -> Vec<super::usage::VersionUsage> {
        self.inner.usage.snapshot()
    }

    async fn status(&self) -> Result<Duration> {
        let started = Instant::now();
        self.inner
            .run(|s, _| Ok(s.get_session_info().map(|_| ())?))
            .await?;
        Ok(started.elapsed())
    }
}
