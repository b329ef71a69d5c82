//! The HSM keystore: master keys inside a PKCS#11 token.
//!
//! Owns the PKCS#11 context, the session pool, the name → handle index and recovery. Knows
//! nothing of HTTP or policy. Every cryptoki call of a request goes through [`Inner::run`], the
//! one seam: it queues the call for the [`workers`] (one OS thread per pool session, so PKCS#11
//! calls, which block for as long as the device takes, never stall the async runtime) and
//! answers `Busy` when no worker takes it within `session_wait`.
//!
//! Index: built from one scan at start, kept current on create/delete, refreshed on a miss
//! (one targeted search at a time, with a short negative cache so floods of unknown names
//! cost nothing), on a stale handle, and before listing when older than [`LIST_RESCAN`].
//!
//! Recovery: a device-level return code (see [`error::classify`]) takes the device out of
//! service at once (requests fail fast with `Unreachable`), waits for in-flight calls, then
//! finalizes, re-initializes, logs in and rebuilds the index, retrying with backoff capped at
//! [`RECOVERY_BACKOFF_MAX`]. A login the token refuses ([`ConnectError::PinRefused`]) is never
//! retried: HSMs lock a partition after a few bad PINs, for every application on it. kesh
//! then waits for the operator, whose reload ([`Pkcs11KeyStore::new_pin`]) makes exactly one
//! attempt.

pub mod copies;
pub mod device;
pub mod error;
pub mod objects;
pub mod probe;
pub mod raw;
pub mod softhsm;
pub mod workers;
pub mod writelock;

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use cryptoki::context::Pkcs11;
use cryptoki::error::Error as CkError;
use cryptoki::mechanism::aead::GcmParams;
use cryptoki::mechanism::Mechanism;
use cryptoki::object::{Attribute, AttributeType, ObjectClass, ObjectHandle};
use cryptoki::session::Session;
use zeroize::Zeroizing;

use self::copies::{nonce_value, CopyError};
use self::device::{ConnectError, Device};
use self::error::{classify, classify_unseal, Failure};
use self::objects::{Meta, Role, State};
use self::workers::{Outcome, Workers};
use self::writelock::{Held, WriteLock};
use super::{
    DataKey, HmacKeySource, ImportKey, KeyInfo, KeyStore, KeystoreError, KeystoreStats, PoolStats,
    Provenance, Result, Scheme,
};
use crate::crypto::{kes, kes::Algorithm, native};
use crate::name::KeyName;
use crate::secret::{Pin, SecretBytes};

/// Listing rescans the token when the index is older than this, so keys made or removed by
/// other kesh instances on the same token show up.
pub const LIST_RESCAN: Duration = Duration::from_secs(5);
/// A name searched for and not found is answered from memory for a while: ten times as long
/// as the search took, within these bounds. Floods of one unknown name then cost at most a
/// tenth of a worker, while on a small token a key another instance just created is found
/// after ~0.1 s rather than a fixed second.
const NEGATIVE_TTL_MIN: Duration = Duration::from_millis(100);
const NEGATIVE_TTL_MAX: Duration = Duration::from_secs(2);
pub const RECOVERY_BACKOFF_MAX: Duration = Duration::from_secs(2);
/// How long a create waits for a concurrent create of the same name on another instance.
const CREATE_CONTENTION_LIMIT: Duration = Duration::from_secs(5);

/// How the token is found: by label or by serial number, never by slot number.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenSelector {
    Label(String),
    Serial(String),
}

impl fmt::Display for TokenSelector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TokenSelector::Label(l) => write!(f, "label '{l}'"),
            TokenSelector::Serial(s) => write!(f, "serial '{s}'"),
        }
    }
}

/// Who draws GCM IVs: kesh (from the HSM's RNG) or the device itself (FIPS-mode HSMs ignore
/// caller IVs and return their own, which kesh then reads back).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IvSource {
    Caller,
    Device,
}

impl fmt::Display for IvSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            IvSource::Caller => "caller",
            IvSource::Device => "device",
        })
    }
}

/// Validated settings of the pkcs11 keystore (`keystore.pkcs11` in the config).
#[derive(Debug, Clone)]
pub struct Pkcs11Config {
    pub module: PathBuf,
    pub token: TokenSelector,
    pub pin: Pin,
    /// Label namespace, so kesh can share a token with other applications.
    pub prefix: String,
    /// Session pool size: the most PKCS#11 calls in flight at once.
    pub sessions: usize,
    /// Scheme of keys made by `create`.
    pub scheme: Scheme,
    pub iv: IvSource,
    /// How long a request waits for a free session before `Busy` (503 + Retry-After).
    pub session_wait: Duration,
    /// Use keys through session-object copies made on the device ([`copies`]).
    pub session_keys: bool,
    /// A file every kesh process on this host takes around token writes ([`writelock`]).
    pub write_lock: Option<PathBuf>,
    pub profile: Option<&'static str>,
}

/// A key as the index knows it: handles valid for one device generation.
#[derive(Debug)]
struct Entry {
    master: ObjectHandle,
    hmac: Option<ObjectHandle>,
    info: KeyInfo,
    /// The creation nonce linking the key's objects ([`objects::Meta`]).
    nonce: u64,
    generation: u64,
}

#[derive(Default)]
struct Index {
    keys: HashMap<KeyName, Arc<Entry>>,
    scanned_at: Option<Instant>,
}

/// Errors inside a blocking closure: a cryptoki code, or a verdict already made.
enum OpError {
    Ck(CkError),
    Fail(KeystoreError),
    /// An index entry from another device generation: search again.
    Stale,
}

impl From<CkError> for OpError {
    fn from(e: CkError) -> Self {
        OpError::Ck(e)
    }
}

impl From<crate::crypto::NotAuthentic> for OpError {
    fn from(_: crate::crypto::NotAuthentic) -> Self {
        OpError::Fail(KeystoreError::NotAuthentic)
    }
}

type OpResult<T> = std::result::Result<T, OpError>;

/// The PKCS#11 keystore. Cheap to clone.
#[derive(Clone)]
pub struct Pkcs11KeyStore {
    inner: Arc<Inner>,
}

struct Inner {
    cfg: Pkcs11Config,
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
    /// Set when the token refused the PIN: no login is attempted until [`Pkcs11KeyStore::new_pin`].
    login_refused: AtomicBool,
    last_failure: Mutex<String>,
    /// Serialises index misses and remembers recent ones, each until its expiry.
    misses: tokio::sync::Mutex<HashMap<KeyName, Instant>>,
    token_description: String,
    write_lock: Option<WriteLock>,
    /// Token searches made (index misses and full scans): requests for indexed keys make none.
    searches: AtomicU64,
}

impl fmt::Debug for Pkcs11KeyStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Pkcs11KeyStore")
            .field("token", &self.inner.cfg.token)
            .finish_non_exhaustive()
    }
}

fn join_error(e: tokio::task::JoinError) -> KeystoreError {
    KeystoreError::Backend(format!("PKCS#11 worker failed: {e}"))
}

impl Pkcs11KeyStore {
    /// Loads the module, finds the token, logs in and builds the index.
    pub async fn open(cfg: Pkcs11Config) -> Result<Self> {
        let started = Instant::now();
        let _writes = TOKEN_WRITES.lock().await;
        let opened = tokio::task::spawn_blocking(move || -> Result<_> {
            let ctx = Pkcs11::new(&cfg.module).map_err(|e| {
                KeystoreError::Unreachable(format!(
                    "cannot load PKCS#11 module {}: {e}",
                    cfg.module.display()
                ))
            })?;
            let device = Device::connect(&ctx, &cfg, &cfg.pin, 0).map_err(|e| match e {
                ConnectError::PinRefused(_) => KeystoreError::Unreachable(format!(
                    "{e}: check `pin:` or `pin_file:`; kesh tried once and will not try again \
                     (HSMs lock a partition after repeated bad PINs)"
                )),
                ConnectError::Failed(why) => KeystoreError::Unreachable(why),
            })?;
            // A server whose creates would all fail does not start.
            device.offers(cfg.scheme).map_err(|e| {
                KeystoreError::InvalidInput(format!(
                    "`scheme: {}`: {e}; `kesh hsm probe` shows the schemes it supports",
                    cfg.scheme
                ))
            })?;
            let info = ctx.get_library_info().ok();
            let token_description = format!(
                "PKCS#11 token {} via {}{}",
                cfg.token,
                cfg.module.display(),
                info.map(|i| format!(" ({})", i.manufacturer_id().trim_end()))
                    .unwrap_or_default()
            );
            let session = device
                .checkout(&ctx)
                .map_err(|e| KeystoreError::Unreachable(e.to_string()))?;
            let keys = scan(&session, &cfg.prefix, 0)
                .map_err(|e| KeystoreError::Unreachable(e.to_string()))?;
            device.checkin(session);
            Ok((ctx, cfg, device, keys, token_description))
        })
        .await
        .map_err(join_error)??;
        let (ctx, cfg, device, keys, token_description) = opened;
        let write_lock = match &cfg.write_lock {
            Some(path) => Some(WriteLock::open(path).map_err(|e| {
                KeystoreError::Unreachable(format!(
                    "cannot open the token write lock {} (`write_lock:`): {e}",
                    path.display()
                ))
            })?),
            None => None,
        };
        let workers = Workers::start(cfg.sessions).map_err(|e| {
            KeystoreError::Unreachable(format!("cannot start the PKCS#11 worker threads: {e}"))
        })?;
        tracing::info!(
            keys = keys.len(),
            elapsed_ms = started.elapsed().as_millis() as u64,
            sessions = cfg.sessions,
            profile = cfg.profile.unwrap_or("none"),
            scheme = %cfg.scheme,
            iv = %cfg.iv,
            session_keys = cfg.session_keys,
            write_lock = %write_lock
                .as_ref()
                .map_or("none".into(), |l| l.path().display().to_string()),
            "pkcs11 keystore ready"
        );
        let pin = Mutex::new(cfg.pin.clone());
        Ok(Pkcs11KeyStore {
            inner: Arc::new(Inner {
                workers,
                calls: RwLock::new(()),
                cfg,
                ctx,
                device: RwLock::new(Some(Arc::new(device))),
                generation: AtomicU64::new(0),
                index: RwLock::new(Index {
                    keys,
                    scanned_at: Some(Instant::now()),
                }),
                recovering: AtomicBool::new(false),
                pin,
                login_refused: AtomicBool::new(false),
                last_failure: Mutex::new(String::new()),
                misses: tokio::sync::Mutex::new(HashMap::new()),
                token_description,
                write_lock,
                searches: AtomicU64::new(0),
            }),
        })
    }

    /// Keys currently in the index (for start-up reports and benchmarks).
    pub fn indexed_keys(&self) -> usize {
        self.inner
            .index
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .keys
            .len()
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

impl Inner {
    fn current_device(&self) -> Result<Arc<Device>> {
        self.device
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
            .ok_or_else(|| {
                let why = self
                    .last_failure
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .clone();
                if self.login_refused.load(Ordering::Acquire) {
                    KeystoreError::Unreachable(why)
                } else {
                    KeystoreError::Unreachable(format!("recovering from: {why}"))
                }
            })
    }

    /// The seam: one blocking closure on one pooled session, on a worker thread.
    /// The closure gets the device, whose generation lets it refuse handles from another
    /// generation before they are used (a re-initialized module may reuse handle numbers).
    async fn run<T, F>(self: &Arc<Self>, f: F) -> std::result::Result<T, Failure>
    where
        T: Send + 'static,
        F: FnOnce(&Session, &Device) -> OpResult<T> + Send + 'static,
    {
        // Fail fast while down, before queueing.
        self.current_device().map_err(Failure::Request)?;
        let inner = self.clone();
        let call = move || {
            let _calls = inner.calls.read().unwrap_or_else(|e| e.into_inner());
            // Taken on the worker: recovery may have swapped the device since the queueing.
            let device = inner.current_device().map_err(OpError::Fail)?;
            let session = device.checkout(&inner.ctx).map_err(OpError::Ck)?;
            let result = f(&session, &device);
            match &result {
                Err(OpError::Ck(e)) if matches!(classify(e), Failure::Device(_)) => drop(session),
                // Closing it ends the operation; any session copies it made go with it, and
                // their next use is a stale handle, retried through a fresh search.
                Err(OpError::Ck(e)) if raw::leaves_operation_active(e) => {
                    tracing::warn!(error = %e, "closing an HSM session whose operation may still be active");
                    drop(session)
                }
                _ => device.checkin(session),
            }
            result
        };
        let wait = self.cfg.session_wait;
        let outcome = match self.workers.call(wait, call).await {
            Outcome::Done(outcome) => outcome,
            Outcome::Busy => return Err(Failure::Request(KeystoreError::Busy(wait))),
            Outcome::Lost => {
                return Err(Failure::Request(KeystoreError::Backend(
                    "a PKCS#11 worker failed during the call".into(),
                )))
            }
        };
        match outcome {
            Ok(v) => Ok(v),
            Err(OpError::Fail(e)) => Err(Failure::Request(e)),
            Err(OpError::Stale) => Err(Failure::StaleHandle),
            Err(OpError::Ck(e)) => {
                let failure = classify(&e);
                if let Failure::Device(why) = &failure {
                    self.begin_recovery(why.clone());
                }
                Err(failure)
            }
        }
    }

    fn begin_recovery(self: &Arc<Self>, why: String) {
        if self.recovering.swap(true, Ordering::AcqRel) {
            return;
        }
        tracing::error!(reason = %why, "PKCS#11 device failure: taking the keystore out of service to recover");
        *self.last_failure.lock().unwrap_or_else(|e| e.into_inner()) = why;
        let old = self
            .device
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        let inner = self.clone();
        tokio::spawn(async move { inner.recover(old).await });
    }

    async fn recover(self: Arc<Self>, mut old: Option<Arc<Device>>) {
        let mut backoff = Duration::from_millis(50);
        let started = Instant::now();
        loop {
            match self.clone().reconnect(old.take()).await {
                Ok(count) => {
                    tracing::info!(
                        keys = count,
                        after_ms = started.elapsed().as_millis() as u64,
                        "PKCS#11 keystore recovered"
                    );
                    return;
                }
                Err(e @ ConnectError::PinRefused(_)) => {
                    self.refuse_logins(&e);
                    return;
                }
                Err(ConnectError::Failed(why)) => {
                    tracing::warn!(reason = %why, retry_in_ms = backoff.as_millis() as u64, "PKCS#11 recovery attempt failed");
                    *self.last_failure.lock().unwrap_or_else(|e| e.into_inner()) = why;
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(RECOVERY_BACKOFF_MAX);
                }
            }
        }
    }

    /// One connection attempt (a single `C_Login`): re-initializes the module, logs in, scans
    /// the token and puts the new device in service. Returns the number of keys found.
    async fn reconnect(
        self: Arc<Self>,
        stale: Option<Arc<Device>>,
    ) -> std::result::Result<usize, ConnectError> {
        let generation = self.generation.fetch_add(1, Ordering::AcqRel) + 1;
        let inner = self.clone();
        let attempt = tokio::task::spawn_blocking(move || {
            // No call is in flight while the module is finalized.
            let _all = inner.calls.write().unwrap_or_else(|e| e.into_inner());
            drop(stale); // closes the old sessions (errors are expected and ignored)
            let _ = inner.ctx.clone().finalize();
            let pin = inner.pin.lock().unwrap_or_else(|e| e.into_inner()).clone();
            let device = Device::connect(&inner.ctx, &inner.cfg, &pin, generation)?;
            let fail = |e: CkError| ConnectError::Failed(e.to_string());
            let session = device.checkout(&inner.ctx).map_err(fail)?;
            let keys = scan(&session, &inner.cfg.prefix, generation).map_err(fail)?;
            device.checkin(session);
            Ok((device, keys))
        })
        .await
        .unwrap_or_else(|e| Err(ConnectError::Failed(e.to_string())));
        let (device, keys) = attempt?;
        let count = keys.len();
        *self.index.write().unwrap_or_else(|e| e.into_inner()) = Index {
            keys,
            scanned_at: Some(Instant::now()),
        };
        *self.device.write().unwrap_or_else(|e| e.into_inner()) = Some(Arc::new(device));
        self.login_refused.store(false, Ordering::Release);
        self.recovering.store(false, Ordering::Release);
        Ok(count)
    }

    /// Stops trying: the keystore stays out of service (requests fail fast) until the
    /// operator reloads. Logged once, with what to do.
    fn refuse_logins(&self, e: &ConnectError) {
        let why = format!(
            "{e}: kesh will not log in again on its own; fix `pin:`/`pin_file:`, then reload \
             (SIGHUP, `systemctl reload kesh`) for one new attempt"
        );
        tracing::error!(reason = %why, "PKCS#11 login refused: waiting for the operator");
        *self.last_failure.lock().unwrap_or_else(|e| e.into_inner()) = why;
        self.login_refused.store(true, Ordering::Release);
    }

    fn label(&self, name: &KeyName) -> String {
        format!("{}{}", self.cfg.prefix, name)
    }

    fn cached(&self, name: &KeyName) -> Option<Arc<Entry>> {
        self.index
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .keys
            .get(name)
            .cloned()
    }

    /// Drops a key from the index, and its session copies with it.
    fn forget(&self, name: &KeyName) {
        let gone = self
            .index
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .keys
            .remove(name);
        if let (Some(e), Ok(device)) = (gone, self.current_device()) {
            for h in [Some(e.master), e.hmac].into_iter().flatten() {
                device.copies.forget(h);
            }
        }
    }

    fn remember(&self, entry: Entry) -> Arc<Entry> {
        let entry = Arc::new(entry);
        self.index
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .keys
            .insert(entry.info.name.clone(), entry.clone());
        entry
    }

    /// The index entry for `name`, searching the token on a miss.
    async fn entry(self: &Arc<Self>, name: &KeyName, force: bool) -> Result<Arc<Entry>> {
        if !force {
            if let Some(e) = self.cached(name) {
                return Ok(e);
            }
        }
        let mut misses = self.misses.lock().await;
        if let Some(e) = self.cached(name) {
            return Ok(e);
        }
        let now = Instant::now();
        misses.retain(|_, until| now < *until);
        if !force && misses.contains_key(name) {
            return Err(KeystoreError::KeyNotFound);
        }
        let label = self.label(name);
        let wanted = name.clone();
        self.searches.fetch_add(1, Ordering::Relaxed);
        let (found, generation) = self
            .run(move |s, d| Ok((find_ready(s, &label, &wanted)?, d.generation)))
            .await
            .map_err(failure_to_error)?;
        match found {
            Some(located) => {
                misses.remove(name);
                Ok(self.remember(located.entry(generation)))
            }
            None => {
                let ttl = (now.elapsed() * 10).clamp(NEGATIVE_TTL_MIN, NEGATIVE_TTL_MAX);
                misses.insert(name.clone(), Instant::now() + ttl);
                Err(KeystoreError::KeyNotFound)
            }
        }
    }

    /// Runs `op` with the handles to use a key by (its session copies when `session_keys` is
    /// on), retrying once through a fresh search when they turn out stale.
    async fn with_key<T, F>(self: &Arc<Self>, name: &KeyName, op: F) -> Result<T>
    where
        T: Send + 'static,
        F: Fn(&Session, &Key) -> OpResult<T> + Clone + Send + Sync + 'static,
    {
        self.with_entry(name, move |s, d, e| {
            let key = Key {
                master: working_handle(d, s, e.master, e.nonce)?,
                device: d,
                entry: e,
            };
            op(s, &key)
        })
        .await
    }

    /// Runs `op` against a key's index entry (its token objects), retrying once through a
    /// fresh search when the handles turn out stale (deleted by another instance, or from
    /// before a recovery).
    async fn with_entry<T, F>(self: &Arc<Self>, name: &KeyName, op: F) -> Result<T>
    where
        T: Send + 'static,
        F: Fn(&Session, &Device, &Entry) -> OpResult<T> + Clone + Send + Sync + 'static,
    {
        let mut force = false;
        for _ in 0..2 {
            let entry = self.entry(name, force).await?;
            let op = op.clone();
            let outcome = self
                .run(move |s, d| {
                    if d.generation != entry.generation {
                        return Err(OpError::Stale);
                    }
                    match op(s, d, &entry) {
                        // The module's way of saying the key may be gone: search once more
                        // (a key still there then fails with the error itself).
                        Err(OpError::Ck(e)) if !force && d.gone_objects.maybe_gone(&e) => {
                            Err(OpError::Stale)
                        }
                        other => other,
                    }
                })
                .await;
            match outcome {
                Ok(v) => return Ok(v),
                Err(Failure::StaleHandle) => {
                    self.forget(name);
                    force = true;
                }
                Err(f) => return Err(failure_to_error(f)),
            }
        }
        self.forget(name);
        Err(KeystoreError::KeyNotFound)
    }

    async fn rescan(self: &Arc<Self>) -> Result<()> {
        let _writes = TOKEN_WRITES.lock().await;
        let prefix = self.cfg.prefix.clone();
        self.searches.fetch_add(1, Ordering::Relaxed);
        let keys = self
            .run(move |s, d| {
                let keys = scan(s, &prefix, d.generation)?;
                let live: HashSet<_> = keys
                    .values()
                    .flat_map(|e| {
                        [Some(e.master), e.hmac]
                            .into_iter()
                            .flatten()
                            .map(|h| copies::original(h, e.nonce))
                    })
                    .collect();
                d.copies.retain(s, &live);
                Ok(keys)
            })
            .await
            .map_err(failure_to_error)?;
        *self.index.write().unwrap_or_else(|e| e.into_inner()) = Index {
            keys,
            scanned_at: Some(Instant::now()),
        };
        Ok(())
    }

    /// The host-wide token write lock, when configured; taken on a worker thread.
    fn hold_writes(&self) -> OpResult<Option<Held<'_>>> {
        self.write_lock
            .as_ref()
            .map(|l| l.hold(CREATE_CONTENTION_LIMIT))
            .transpose()
            .map_err(|why| OpError::Fail(KeystoreError::Backend(why)))
    }

    /// Creates a key's objects through the on-token protocol.
    async fn create_key(self: &Arc<Self>, name: &KeyName, spec: NewKey) -> Result<()> {
        let _writes = TOKEN_WRITES.lock().await;
        let label = self.label(name);
        let key_name = name.clone();
        let inner = self.clone();
        let entry = self
            .run(move |s, d| {
                d.offers(spec.scheme).map_err(OpError::Fail)?;
                let _held = inner.hold_writes()?;
                create_on_token(s, &label, &key_name, spec, d.generation)
            })
            .await
            .map_err(failure_to_error)?;
        self.misses.lock().await.remove(name);
        self.remember(entry);
        Ok(())
    }
}

/// Serialises this process's token writes (create, import, delete) and full scans, across
/// every keystore instance in the process: SoftHSM's object store fails (CKR_GENERAL_ERROR,
/// half-read objects) when one process's threads create objects and scan concurrently, and
/// writes are rare enough that one at a time costs nothing. Other processes are handled by
/// the on-token protocol in `create_on_token`.
static TOKEN_WRITES: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn failure_to_error(f: Failure) -> KeystoreError {
    match f {
        Failure::Device(why) => KeystoreError::Unreachable(why),
        Failure::StaleHandle => KeystoreError::KeyNotFound,
        Failure::Request(e) => e,
    }
}

/// What a create writes.
struct NewKey {
    scheme: Scheme,
    algorithm: Algorithm,
    /// `None`: the device generates the master key.
    material: Option<Zeroizing<Vec<u8>>>,
    hmac: NewHmac,
    provenance: Provenance,
}

enum NewHmac {
    Generate,
    Given(Zeroizing<Vec<u8>>),
    None,
}

/// An object found under a key's label, with its decoded metadata.
struct Found {
    handle: ObjectHandle,
    meta: Option<Meta>,
}

fn survey(s: &Session, label: &str) -> std::result::Result<Vec<Found>, CkError> {
    // Token objects only: never a session copy ([`copies`]) or a `kwp` transient.
    let handles = s.find_objects(&[
        Attribute::Class(ObjectClass::SECRET_KEY),
        Attribute::Token(true),
        Attribute::Label(label.as_bytes().to_vec()),
    ])?;
    let mut out = Vec::with_capacity(handles.len());
    for handle in handles {
        let meta = match s.get_attributes(handle, &[AttributeType::Id]) {
            Ok(attrs) => attrs.into_iter().find_map(|a| match a {
                Attribute::Id(id) => Meta::decode(&id),
                _ => None,
            }),
            // Deleted between the search and the read: not there.
            Err(e) if matches!(classify(&e), Failure::StaleHandle) => continue,
            Err(e) => return Err(e),
        };
        out.push(Found { handle, meta });
    }
    Ok(out)
}

/// A ready key found on the token.
struct Located {
    master: ObjectHandle,
    hmac: Option<ObjectHandle>,
    info: KeyInfo,
    nonce: u64,
}

impl Located {
    fn entry(self, generation: u64) -> Entry {
        Entry {
            master: self.master,
            hmac: self.hmac,
            info: self.info,
            nonce: self.nonce,
            generation,
        }
    }
}

/// A key for one operation: the master handle to use, and what the index and the device know.
struct Key<'a> {
    master: ObjectHandle,
    device: &'a Device,
    entry: &'a Entry,
}

impl Key<'_> {
    fn info(&self) -> &KeyInfo {
        &self.entry.info
    }

    /// The HMAC key's handle to use; resolved only by the operation that needs it.
    fn hmac(&self, s: &Session) -> OpResult<ObjectHandle> {
        let h = self
            .entry
            .hmac
            .ok_or(OpError::Fail(KeystoreError::HmacUnsupported))?;
        working_handle(self.device, s, h, self.entry.nonce)
    }
}

/// The handle to operate with for the token object `h`: its session copy, or `h` itself.
fn working_handle(d: &Device, s: &Session, h: ObjectHandle, nonce: u64) -> OpResult<ObjectHandle> {
    match d.copies.working(s, h, nonce) {
        Ok(h) => Ok(h),
        Err(CopyError::Stale) => Err(OpError::Stale),
        Err(CopyError::Ck(c)) => Err(OpError::Ck(c)),
    }
}

/// An unsealing call's error: "not authentic" in the module's own words, or the error.
fn unseal_error(e: CkError, key: &Key) -> OpError {
    match classify_unseal(&e, key.device.tag_failures) {
        Failure::Request(KeystoreError::NotAuthentic) => OpError::Fail(KeystoreError::NotAuthentic),
        _ => OpError::Ck(e),
    }
}

/// The ready key under `label`, if any.
fn find_ready(
    s: &Session,
    label: &str,
    name: &KeyName,
) -> std::result::Result<Option<Located>, CkError> {
    let found = survey(s, label)?;
    Ok(pick_ready(&found, name))
}

/// Whether a committed master key is under the label, readable by this version or not: a
/// create must never remove one (a newer kesh may have written a scheme this one can't name).
fn has_ready_master(found: &[Found]) -> bool {
    found.iter().any(|f| {
        f.meta
            .as_ref()
            .is_some_and(|m| m.role == Role::Key && m.state == State::Ready)
    })
}

fn pick_ready(found: &[Found], name: &KeyName) -> Option<Located> {
    // Two ready masters cannot come out of the create protocol; if a foreign tool made them,
    // the smallest nonce wins on every instance alike.
    let master = found
        .iter()
        .filter_map(|f| f.meta.as_ref().map(|m| (f, m)))
        .filter(|(_, m)| m.role == Role::Key && m.state == State::Ready)
        .min_by(|a, b| a.1.nonce.cmp(&b.1.nonce))?;
    let info = master.1.key_info(name)?;
    let nonce = nonce_value(&master.1.nonce);
    let hmac = found
        .iter()
        .find(|f| {
            f.meta.as_ref().is_some_and(|m| {
                m.role == Role::Hmac && m.state == State::Ready && m.nonce == master.1.nonce
            })
        })
        .map(|f| f.handle);
    Some(Located {
        master: master.0.handle,
        hmac,
        info,
        nonce,
    })
}

/// Scans every secret key on the token once and builds the index.
fn scan(
    s: &Session,
    prefix: &str,
    generation: u64,
) -> std::result::Result<HashMap<KeyName, Arc<Entry>>, CkError> {
    let handles = s.find_objects(&[
        Attribute::Class(ObjectClass::SECRET_KEY),
        Attribute::Token(true),
    ])?;
    let mut by_name: HashMap<KeyName, Vec<Found>> = HashMap::new();
    for handle in handles {
        let attrs = match s.get_attributes(handle, &[AttributeType::Label, AttributeType::Id]) {
            Ok(a) => a,
            Err(e) if matches!(classify(&e), Failure::StaleHandle) => continue,
            Err(e) => return Err(e),
        };
        let (mut label, mut meta) = (None, None);
        for a in attrs {
            match a {
                Attribute::Label(l) => label = String::from_utf8(l).ok(),
                Attribute::Id(id) => meta = Meta::decode(&id),
                _ => {}
            }
        }
        let Some(name) = label
            .as_deref()
            .and_then(|l| l.strip_prefix(prefix))
            .and_then(|n| KeyName::new(n).ok())
        else {
            continue;
        };
        if meta.is_some() {
            by_name
                .entry(name)
                .or_default()
                .push(Found { handle, meta });
        }
    }
    Ok(by_name
        .into_iter()
        .filter_map(|(name, found)| {
            let located = pick_ready(&found, &name)?;
            Some((name, Arc::new(located.entry(generation))))
        })
        .collect())
}

fn random_nonce(s: &Session) -> std::result::Result<String, CkError> {
    let mut n = [0u8; 8];
    s.generate_random_slice(&mut n)?;
    Ok(hex::encode(n))
}

fn unix_now() -> i64 {
    time::OffsetDateTime::now_utc().unix_timestamp()
}

/// Creates a key so that concurrent creators of one name, in any process, end with exactly
/// one key (DESIGN.md §3). Each creator writes its objects `pending`, then looks again:
///
/// 1. a `ready` key under the label → "key already exists";
/// 2. a live (not stale) object of another creator → remove ours, back off, start over;
/// 3. otherwise commit: the HMAC key `ready`, then the master `ready` (the commit point).
///
/// Two creators cannot both pass step 2: whoever looks second sees the first's objects,
/// pending or ready. Objects of a creator that crashed go stale after
/// [`objects::STALE_PENDING_SECS`] and are removed by the next create, and so is a ready HMAC
/// key whose master is gone (a delete removes the master first: one that crashed half-way).
/// Processes sharing a host lock ([`writelock`]) never contend here; the protocol is what
/// keeps instances on different hosts apart.
fn create_on_token(
    s: &Session,
    label: &str,
    name: &KeyName,
    spec: NewKey,
    generation: u64,
) -> OpResult<Entry> {
    let deadline = Instant::now() + CREATE_CONTENTION_LIMIT;
    let mut backoff_ms = 2u64;
    loop {
        let found = survey(s, label)?;
        if has_ready_master(&found) {
            return Err(OpError::Fail(KeystoreError::KeyExists));
        }
        let now = unix_now();
        let mut contended = false;
        for f in &found {
            match &f.meta {
                Some(m) if now - m.ts > objects::STALE_PENDING_SECS || orphan(&found, m) => {
                    let _ = s.destroy_object(f.handle);
                }
                Some(_) => contended = true,
                None => {}
            }
        }
        if !contended {
            let nonce = random_nonce(s)?;
            let written = write_pending(s, label, &nonce, &spec)?;
            let found = survey(s, label)?;
            let others_live = found.iter().any(|f| {
                f.meta.as_ref().is_some_and(|m| {
                    m.nonce != nonce
                        && (m.state == State::Ready
                            || unix_now() - m.ts <= objects::STALE_PENDING_SECS)
                })
            });
            if !others_live {
                return commit(s, written, name, generation).map_err(OpError::Ck);
            }
            let exists = has_ready_master(&found);
            written.destroy(s);
            if exists {
                return Err(OpError::Fail(KeystoreError::KeyExists));
            }
        }
        if Instant::now() > deadline {
            return Err(OpError::Fail(KeystoreError::Backend(format!(
                "another instance keeps creating '{name}' at the same time; try again"
            ))));
        }
        // Random jitter breaks ties between instances that back off together.
        let mut jitter = [0u8; 1];
        let _ = s.generate_random_slice(&mut jitter);
        std::thread::sleep(Duration::from_millis(backoff_ms + u64::from(jitter[0] % 8)));
        backoff_ms = (backoff_ms * 2).min(64);
    }
}

/// A ready HMAC key without its master: what a delete that stopped half-way leaves.
fn orphan(found: &[Found], m: &Meta) -> bool {
    m.role == Role::Hmac
        && m.state == State::Ready
        && !found.iter().any(|f| {
            f.meta
                .as_ref()
                .is_some_and(|k| k.role == Role::Key && k.nonce == m.nonce)
        })
}

struct Written {
    master: ObjectHandle,
    master_meta: Meta,
    hmac: Option<(ObjectHandle, Meta)>,
    scheme: Scheme,
}

impl Written {
    fn destroy(&self, s: &Session) {
        let _ = s.destroy_object(self.master);
        if let Some((h, _)) = &self.hmac {
            let _ = s.destroy_object(*h);
        }
    }
}

fn write_pending(s: &Session, label: &str, nonce: &str, spec: &NewKey) -> OpResult<Written> {
    let hmac_meta = Meta::new(
        Role::Hmac,
        nonce,
        spec.scheme,
        spec.algorithm,
        &spec.provenance,
    );
    let hmac = match &spec.hmac {
        NewHmac::None => None,
        NewHmac::Generate => {
            let t = objects::hmac_template(label, &hmac_meta, None);
            Some(s.generate_key(&Mechanism::GenericSecretKeyGen, &t)?)
        }
        NewHmac::Given(v) => {
            let mut t = objects::hmac_template(label, &hmac_meta, Some(v.to_vec()));
            let h = s.create_object(&t);
            objects::wipe(&mut t);
            Some(h?)
        }
    };
    let master_meta = Meta::new(
        Role::Key,
        nonce,
        spec.scheme,
        spec.algorithm,
        &spec.provenance,
    );
    let master = match &spec.material {
        None => {
            let t = objects::master_template(label, &master_meta, spec.scheme, None);
            let keygen = match spec.scheme {
                Scheme::Gcm | Scheme::Kwp => Mechanism::AesKeyGen,
                // The `kes` scheme's master is an HMAC key (generic secret).
                Scheme::Kes => Mechanism::GenericSecretKeyGen,
            };
            s.generate_key(&keygen, &t)
        }
        Some(v) => {
            let mut t =
                objects::master_template(label, &master_meta, spec.scheme, Some(v.to_vec()));
            let h = s.create_object(&t);
            objects::wipe(&mut t);
            h
        }
    };
    match master {
        Ok(master) => Ok(Written {
            master,
            master_meta,
            hmac: hmac.map(|h| (h, hmac_meta)),
            scheme: spec.scheme,
        }),
        Err(e) => {
            if let Some(h) = hmac {
                let _ = s.destroy_object(h);
            }
            Err(e.into())
        }
    }
}

fn commit(
    s: &Session,
    w: Written,
    name: &KeyName,
    generation: u64,
) -> std::result::Result<Entry, CkError> {
    let result = (|| {
        if let Some((h, meta)) = &w.hmac {
            s.update_attributes(*h, &[Attribute::Id(meta.clone().ready().encode())])?;
        }
        let ready = w.master_meta.clone().ready();
        s.update_attributes(w.master, &[Attribute::Id(ready.encode())])?;
        Ok(ready)
    })();
    match result {
        Ok(meta) => {
            let info = meta.key_info(name).unwrap_or(KeyInfo {
                name: name.clone(),
                scheme: w.scheme,
                algorithm: Algorithm::Aes256,
                created_at: meta.created_at,
                created_by: meta.created_by.clone(),
            });
            Ok(Entry {
                master: w.master,
                hmac: w.hmac.map(|(h, _)| h),
                info,
                nonce: nonce_value(&meta.nonce),
                generation,
            })
        }
        Err(e) => {
            w.destroy(s);
            Err(e)
        }
    }
}

/// Seals `plaintext` on the device with the key's scheme. `rnd` holds fresh random bytes
/// for the IV (and nonce): 12 for `gcm`, 28 for `kes`, none for `kwp`.
fn seal_on_device(
    s: &Session,
    e: &Key,
    iv_source: IvSource,
    rnd: &[u8],
    plaintext: &[u8],
    context: &[u8],
) -> OpResult<Vec<u8>> {
    match e.info().scheme {
        Scheme::Gcm => {
            let mut iv = [0u8; native::GCM_IV_LEN];
            if iv_source == IvSource::Caller {
                iv.copy_from_slice(&rnd[..native::GCM_IV_LEN]);
            }
            let sealed = {
                let params =
                    GcmParams::new(&mut iv, context, (native::GCM_TAG_LEN as u64 * 8).into())?;
                let gcm = Mechanism::AesGcm(params);
                match e.device.raw.as_ref() {
                    Some(raw) => raw.encrypt(
                        s,
                        &gcm,
                        e.master,
                        plaintext,
                        plaintext.len() + native::GCM_TAG_LEN,
                    )?,
                    None => s.encrypt(&gcm, e.master, plaintext)?,
                }
            };
            // The buffer now holds the IV the device used: ours, or one it drew itself. A
            // device that neither took ours nor wrote one back sealed under the all-zero IV
            // we handed it, and every such seal would reuse that nonce: refuse.
            if iv_source == IvSource::Device && iv == [0u8; native::GCM_IV_LEN] {
                return Err(OpError::Fail(KeystoreError::Backend(
                    "the HSM wrote no GCM IV back (iv: device); this device uses the IV it is \
                     given: set `iv: caller` (see `kesh hsm probe`)"
                        .into(),
                )));
            }
            Ok(native::encode_gcm(&iv, &sealed))
        }
        Scheme::Kwp => {
            let (pad, inner) = native::kwp_inner(plaintext, context);
            let mut t = objects::transient_template(inner.to_vec());
            let obj = s.create_object(&t);
            objects::wipe(&mut t);
            let obj = obj?;
            let wrapped = s.wrap_key(&Mechanism::AesKeyWrapPad, e.master, obj);
            let _ = s.destroy_object(obj);
            Ok(native::encode_kwp(pad, &wrapped?))
        }
        Scheme::Kes => {
            let iv: [u8; kes::IV_LEN] = rnd[..kes::IV_LEN]
                .try_into()
                .map_err(|_| OpError::Fail(KeystoreError::Backend("short random".into())))?;
            let nonce: [u8; kes::NONCE_LEN] = rnd[kes::IV_LEN..kes::TRAILER_LEN]
                .try_into()
                .map_err(|_| OpError::Fail(KeystoreError::Backend("short random".into())))?;
            let derived = derive_on_device(s, e, &iv)?;
            Ok(kes::seal(
                e.info().algorithm,
                &derived,
                &iv,
                &nonce,
                plaintext,
                context,
            ))
        }
    }
}

/// The `kes` scheme's per-message key, HMAC-SHA256(master, iv), computed on the device.
fn derive_on_device(s: &Session, e: &Key, iv: &[u8; kes::IV_LEN]) -> OpResult<Zeroizing<[u8; 32]>> {
    let mac = Zeroizing::new(s.sign(&Mechanism::Sha256Hmac, e.master, iv)?);
    let mut out = Zeroizing::new([0u8; 32]);
    if mac.len() != 32 {
        return Err(OpError::Fail(KeystoreError::Backend(format!(
            "CKM_SHA256_HMAC returned {} bytes",
            mac.len()
        ))));
    }
    out.copy_from_slice(&mac);
    Ok(out)
}

fn open_on_device(
    s: &Session,
    e: &Key,
    ciphertext: &[u8],
    context: &[u8],
) -> OpResult<SecretBytes> {
    match e.info().scheme {
        Scheme::Gcm => {
            let (mut iv, sealed) = native::parse_gcm(ciphertext)?;
            let params = GcmParams::new(&mut iv, context, (native::GCM_TAG_LEN as u64 * 8).into())?;
            let gcm = Mechanism::AesGcm(params);
            match e.device.raw.as_ref() {
                Some(raw) => raw.decrypt(s, &gcm, e.master, sealed),
                None => s.decrypt(&gcm, e.master, sealed).map(Zeroizing::new),
            }
            .map_err(|err| unseal_error(err, e))
        }
        Scheme::Kwp => {
            let (pad, wrapped) = native::parse_kwp(ciphertext)?;
            let obj = match s.unwrap_key(
                &Mechanism::AesKeyWrapPad,
                e.master,
                wrapped,
                &objects::transient_unwrap_template(),
            ) {
                Ok(obj) => obj,
                Err(err) => return Err(unseal_error(err, e)),
            };
            let value = s.get_attributes(obj, &[AttributeType::Value]);
            let _ = s.destroy_object(obj);
            let inner = value?
                .into_iter()
                .find_map(|a| match a {
                    Attribute::Value(v) => Some(Zeroizing::new(v)),
                    _ => None,
                })
                .ok_or(OpError::Fail(KeystoreError::NotAuthentic))?;
            Ok(native::kwp_open(&inner, pad, context)?)
        }
        Scheme::Kes => {
            let parts = kes::parse(ciphertext)?;
            let derived = derive_on_device(s, e, &parts.iv)?;
            Ok(kes::open(e.info().algorithm, &derived, &parts, context)?)
        }
    }
}

/// Random bytes a seal needs besides the plaintext.
fn seal_random_len(scheme: Scheme, iv: IvSource) -> usize {
    match (scheme, iv) {
        (Scheme::Gcm, IvSource::Caller) => native::GCM_IV_LEN,
        (Scheme::Gcm, IvSource::Device) | (Scheme::Kwp, _) => 0,
        (Scheme::Kes, _) => kes::TRAILER_LEN,
    }
}

#[async_trait::async_trait]
impl KeyStore for Pkcs11KeyStore {
    fn description(&self) -> String {
        self.inner.token_description.clone()
    }

    async fn create(&self, name: &KeyName, provenance: Provenance) -> Result<()> {
        let spec = NewKey {
            scheme: self.inner.cfg.scheme,
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
            .with_entry(name, |s, _, e| {
                s.get_attributes(e.master, &[AttributeType::Class])?;
                Ok(e.info.clone())
            })
            .await
    }

    async fn list(&self, prefix: &str) -> Result<Vec<KeyName>> {
        let stale = self
            .inner
            .index
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .scanned_at
            .is_none_or(|at| at.elapsed() > LIST_RESCAN);
        if stale {
            self.inner.rescan().await?;
        }
        let index = self.inner.index.read().unwrap_or_else(|e| e.into_inner());
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
        let _writes = TOKEN_WRITES.lock().await;
        let inner = self.inner.clone();
        let result = self
            .inner
            .with_entry(name, move |s, d, e| {
                let _held = inner.hold_writes()?;
                // The master goes first: that is the commit point of a delete.
                s.destroy_object(e.master)?;
                d.copies.discard(s, e.master);
                if let Some(h) = e.hmac {
                    let _ = s.destroy_object(h);
                    d.copies.discard(s, h);
                }
                Ok(())
            })
            .await;
        self.inner.forget(name);
        result
    }

    async fn generate(&self, name: &KeyName, context: &[u8]) -> Result<DataKey> {
        let context = Arc::new(context.to_vec());
        let iv_source = self.inner.cfg.iv;
        let (plaintext, ciphertext) = self
            .inner
            .with_key(name, move |s, e| {
                let extra = seal_random_len(e.info().scheme, iv_source);
                // One C_GenerateRandom for the DEK and the IV.
                let mut rnd = Zeroizing::new([0u8; 32 + kes::TRAILER_LEN]);
                s.generate_random_slice(&mut rnd[..32 + extra])?;
                let mut dek = Zeroizing::new([0u8; 32]);
                dek.copy_from_slice(&rnd[..32]);
                let ct = seal_on_device(
                    s,
                    e,
                    iv_source,
                    &rnd[32..32 + extra],
                    dek.as_ref(),
                    &context,
                )?;
                Ok((dek, ct))
            })
            .await?;
        Ok(DataKey {
            plaintext,
            ciphertext,
        })
    }

    async fn encrypt(&self, name: &KeyName, plaintext: &[u8], context: &[u8]) -> Result<Vec<u8>> {
        let plaintext = Arc::new(Zeroizing::new(plaintext.to_vec()));
        let context = Arc::new(context.to_vec());
        let iv_source = self.inner.cfg.iv;
        let ct = self
            .inner
            .with_key(name, move |s, e| {
                let mut rnd = [0u8; kes::TRAILER_LEN];
                let extra = seal_random_len(e.info().scheme, iv_source);
                s.generate_random_slice(&mut rnd[..extra])?;
                seal_on_device(s, e, iv_source, &rnd[..extra], &plaintext, &context)
            })
            .await?;
        Ok(ct)
    }

    async fn decrypt(
        &self,
        name: &KeyName,
        ciphertext: &[u8],
        context: &[u8],
    ) -> Result<SecretBytes> {
        let ciphertext = Arc::new(ciphertext.to_vec());
        let context = Arc::new(context.to_vec());
        self.inner
            .with_key(name, move |s, e| {
                open_on_device(s, e, &ciphertext, &context)
            })
            .await
    }

    async fn hmac(&self, name: &KeyName, message: &[u8]) -> Result<[u8; 32]> {
        let message = Arc::new(message.to_vec());
        self.inner
            .with_key(name, move |s, e| {
                let mac = s.sign(&Mechanism::Sha256Hmac, e.hmac(s)?, &message)?;
                mac.try_into().map_err(|_| {
                    OpError::Fail(KeystoreError::Backend(
                        "CKM_SHA256_HMAC returned a short MAC".into(),
                    ))
                })
            })
            .await
    }

    fn stats(&self) -> KeystoreStats {
        let w = self.inner.workers.stats();
        KeystoreStats {
            pool: Some(PoolStats {
                size: w.size,
                in_use: w.running,
                acquired: w.started,
                wait_seconds: w.waited.as_secs_f64(),
            }),
            login_refused: Some(self.inner.login_refused.load(Ordering::Acquire)),
            unreadable_key_files: None,
        }
    }

    async fn reload_pin(&self, pin: Pin) -> Result<()> {
        *self.inner.pin.lock().unwrap_or_else(|e| e.into_inner()) = pin;
        if !self.inner.login_refused.load(Ordering::Acquire) {
            return Ok(());
        }
        tracing::info!("reload: one login attempt with the PIN the configuration gives now");
        match self.inner.clone().reconnect(None).await {
            Ok(keys) => {
                tracing::info!(
                    keys,
                    "PKCS#11 login accepted: the keystore is back in service"
                );
                Ok(())
            }
            Err(e @ ConnectError::PinRefused(_)) => {
                self.inner.refuse_logins(&e);
                Err(KeystoreError::Unreachable(e.to_string()))
            }
            Err(ConnectError::Failed(why)) => {
                // Not the PIN: the device itself is away. Back to recovery's backoff, which
                // logs in once when the device answers again.
                self.inner.login_refused.store(false, Ordering::Release);
                *self
                    .inner
                    .last_failure
                    .lock()
                    .unwrap_or_else(|e| e.into_inner()) = why.clone();
                tokio::spawn(self.inner.clone().recover(None));
                Err(KeystoreError::Unreachable(why))
            }
        }
    }

    async fn status(&self) -> Result<Duration> {
        let started = Instant::now();
        self.inner
            .run(|s, _| Ok(s.get_session_info().map(|_| ())?))
            .await
            .map_err(failure_to_error)?;
        Ok(started.elapsed())
    }
}
