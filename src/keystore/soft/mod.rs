//! The embedded keystore: every scheme in software, for `--dev` and machines without an HSM.
//!
//! Keys live in memory, optionally backed by a directory where each key is one file holding
//! its record wrapped with AES-KWP under a key-encryption key read from a file. Produces the
//! same bytes as the pkcs11 keystore for the same key and IV (`docs/FORMAT.md`).
//!
//! Several kesh processes may share one directory. The files are the truth and memory only a
//! cache: every use of a key checks its file (one `stat`) and reloads it when the file was
//! replaced, so a key deleted by another process stops working at once, and a name deleted and
//! created again is never served with the old key. Creates are exclusive across processes
//! (hard-link commit); listings read the directory.
//!
//! Key versions (rotation): version 1 is `<name>.key`; version N ≥ 2 is its own file
//! `<name>.v<N>` (no `.key` suffix, so listings never see it; names cannot hold `.`), made
//! exclusive by the same hard-link commit, so two rotations in two processes make two
//! versions and a scheduled one ("N+1 only if N is the newest") happens once. Every use checks
//! the file of the version it needs and whether the next version's file appeared (one `stat`
//! each), so a rotation or a destroyed version elsewhere is seen at the next request. A version
//! file names the creation time of its key's version 1, so one left by an interrupted delete
//! is never taken for a version of a new key of the same name (it is removed instead).
//!
//! File hygiene: the directory is created 0700, a KEK file others can read is refused, temp
//! files left by a crash are removed at start, and a key file that cannot be read, opened
//! under the KEK or named is skipped, logged and counted (`kesh_keystore_unreadable_key_files`)
//! instead of stopping the keystore.

use std::collections::{BTreeMap, BTreeSet};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant, SystemTime};

use time::OffsetDateTime;
use zeroize::Zeroizing;

pub use self::error::SoftError;

mod error;

use super::{
    BackendError, DataKey, HmacKeySource, ImportKey, KeyInfo, KeyStore, KeystoreError,
    KeystoreStats, Provenance, Result, ScheduledRotation, Scheme, VersionInfo,
};
use crate::crypto::{self, kes, kes::Algorithm, native};
use crate::locks::IgnorePoison;
use crate::name::KeyName;
use crate::secret::{self, Key32, SecretBytes};

/// One key: its public facts and its secrets.
#[derive(Clone)]
struct SoftKey {
    /// `info.version` is the newest version's number.
    info: KeyInfo,
    /// Version 1's key.
    master: Key32,
    hmac: Option<Key32>,
    /// The file this key was read from or written to (directory stores).
    file: Option<FileId>,
    /// Versions 2 and up, oldest first.
    versions: Vec<SoftVersion>,
}

#[derive(Clone)]
struct SoftVersion {
    version: u32,
    created_at: OffsetDateTime,
    created_by: String,
    master: Key32,
    file: Option<FileId>,
}

impl SoftKey {
    /// The newest version's number and key.
    fn sealing(&self) -> (u32, &Key32) {
        match self.versions.last() {
            Some(v) => (v.version, &v.master),
            None => (1, &self.master),
        }
    }

    fn version(&self, version: u32) -> Option<&Key32> {
        if version == 1 {
            return Some(&self.master);
        }
        self.versions
            .iter()
            .find(|v| v.version == version)
            .map(|v| &v.master)
    }

    /// Every version's number and creation time, oldest first.
    fn version_times(&self) -> Vec<(u32, OffsetDateTime)> {
        std::iter::once((1, self.info.created_at))
            .chain(self.versions.iter().map(|v| (v.version, v.created_at)))
            .collect()
    }

    fn set_versions(&mut self, mut versions: Vec<SoftVersion>) {
        versions.sort_by_key(|v| v.version);
        self.info.version = versions.last().map_or(1, |v| v.version);
        self.versions = versions;
    }
}

/// Which file a key came from: a file deleted and written again under the same name differs
/// in inode or change time (inode numbers alone may be reused).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct FileId {
    dev: u64,
    ino: u64,
    ctime: i64,
    ctime_nsec: i64,
}

impl FileId {
    fn of(m: &std::fs::Metadata) -> Self {
        FileId {
            dev: m.dev(),
            ino: m.ino(),
            ctime: m.ctime(),
            ctime_nsec: m.ctime_nsec(),
        }
    }
}

/// The embedded keystore: keys in memory, or KEK-wrapped files in a directory. Cheap to share.
pub struct SoftKeyStore {
    keys: RwLock<BTreeMap<KeyName, Arc<SoftKey>>>,
    dir: Option<KeyDir>,
    scheme: Scheme,
    usage: super::usage::Usage,
}

impl std::fmt::Debug for SoftKeyStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SoftKeyStore")
            .field("dir", &self.dir.as_ref().map(|d| &d.path))
            .finish_non_exhaustive()
    }
}

fn rng_error(e: getrandom::Error) -> KeystoreError {
    KeystoreError::Backend(BackendError::Random(e))
}

impl SoftKeyStore {
    /// An empty store that forgets everything on exit.
    pub fn in_memory() -> Self {
        SoftKeyStore {
            keys: RwLock::new(BTreeMap::new()),
            dir: None,
            scheme: Scheme::Gcm,
            usage: Default::default(),
        }
    }

    /// A store backed by `path`, one wrapped file per key, under the KEK in `kek_file`
    /// (32 bytes as base64 or hex text). Key files that cannot be read are skipped and counted;
    /// when there are key files and none opens, the KEK is wrong and the store refuses to open.
    pub fn open_dir(path: &Path, kek_file: &Path) -> Result<Self> {
        let dir = KeyDir::open(path, kek_file)?;
        dir.remove_stale_temp_files();
        let keys = dir.load_all()?;
        Ok(SoftKeyStore {
            keys: RwLock::new(keys),
            dir: Some(dir),
            scheme: Scheme::Gcm,
            usage: Default::default(),
        })
    }

    /// The scheme for keys made by `create`.
    pub fn with_scheme(mut self, scheme: Scheme) -> Self {
        self.scheme = scheme;
        self
    }

    fn cached(&self, name: &KeyName) -> Option<Arc<SoftKey>> {
        // A poisoned lock means a panic mid-update of a map of Arcs: the map itself is intact.
        self.keys.read().ignore_poison().get(name).cloned()
    }

    /// The key to use now, for its sealing version or for `version`. In a directory store the
    /// files decide: gone means gone (even if cached), a file other than the cached one is
    /// read afresh, and so are the versions when the next one's file appeared or the wanted
    /// one's changed.
    fn key_for(&self, name: &KeyName, version: Option<u32>) -> Result<Arc<SoftKey>> {
        let cached = self.cached(name);
        let Some(dir) = &self.dir else {
            return cached.ok_or(KeystoreError::KeyNotFound);
        };
        let Some(id) = dir.file_id(name)? else {
            self.forget(name);
            return Err(KeystoreError::KeyNotFound);
        };
        if let Some(key) = cached.filter(|k| k.file == Some(id)) {
            let next = dir.version_file_id(name, key.info.version + 1)?;
            let wanted_ok = match version {
                None | Some(1) => true,
                Some(v) => {
                    let on_disk = dir.version_file_id(name, v)?;
                    let cached = key.versions.iter().find(|x| x.version == v);
                    match (on_disk, cached) {
                        (None, None) => true,
                        (Some(d), Some(c)) => c.file == Some(d),
                        _ => false,
                    }
                }
            };
            if next.is_none() && wanted_ok {
                return Ok(key);
            }
            let mut fresh = (*key).clone();
            fresh.set_versions(dir.load_versions(name, &fresh, dir.version_numbers(name)?)?);
            let fresh = Arc::new(fresh);
            self.keys
                .write()
                .ignore_poison()
                .insert(name.clone(), fresh.clone());
            return Ok(fresh);
        }
        match dir.load(name) {
            Ok(Some(key)) => {
                let key = Arc::new(key);
                self.keys
                    .write()
                    .ignore_poison()
                    .insert(name.clone(), key.clone());
                Ok(key)
            }
            Ok(None) => {
                self.forget(name);
                Err(KeystoreError::KeyNotFound)
            }
            Err(e) => {
                self.forget(name);
                Err(e)
            }
        }
    }

    fn key(&self, name: &KeyName) -> Result<Arc<SoftKey>> {
        self.key_for(name, None)
    }

    /// Makes the key's next version. With `due`, only when the newest version is at least
    /// that old and still the newest when the new one commits (`None` otherwise).
    fn add_version(
        &self,
        name: &KeyName,
        due: Option<Duration>,
        provenance: Provenance,
    ) -> Result<Option<u32>> {
        // Each round loses only to a version another rotation committed: bounded by them.
        for _ in 0..1000 {
            let key = self.key(name)?;
            let (newest, newest_at) = key
                .version_times()
                .last()
                .copied()
                .unwrap_or((1, key.info.created_at));
            if let Some(period) = due {
                if OffsetDateTime::now_utc() - newest_at < period {
                    return Ok(None);
                }
            }
            let mut version = SoftVersion {
                version: newest + 1,
                created_at: provenance.created_at,
                created_by: provenance.created_by.clone(),
                master: secret::random::<32>().map_err(rng_error)?,
                file: None,
            };
            let mut keys = self.keys.write().ignore_poison();
            match &self.dir {
                Some(dir) => match dir.store_version(name, &key, &version) {
                    Ok(id) => version.file = Some(id),
                    // Another process made this version first.
                    Err(KeystoreError::KeyExists) if due.is_some() => return Ok(None),
                    Err(KeystoreError::KeyExists) => continue,
                    Err(e) => return Err(e),
                },
                None => {
                    let current = keys.get(name).ok_or(KeystoreError::KeyNotFound)?;
                    if current.info.version != newest {
                        if due.is_some() {
                            return Ok(None);
                        }
                        continue;
                    }
                }
            }
            let base = keys.get(name).cloned().unwrap_or(key);
            let mut fresh = (*base).clone();
            let mut versions = fresh.versions.clone();
            versions.retain(|v| v.version != version.version);
            versions.push(version);
            fresh.set_versions(versions);
            keys.insert(name.clone(), Arc::new(fresh));
            return Ok(Some(newest + 1));
        }
        Err(KeystoreError::Backend(
            SoftError::RotateContended(name.to_string()).into(),
        ))
    }

    fn forget(&self, name: &KeyName) {
        self.keys.write().ignore_poison().remove(name);
    }

    fn insert(&self, name: &KeyName, mut key: SoftKey) -> Result<()> {
        let mut keys = self.keys.write().ignore_poison();
        match &self.dir {
            // The link decides, across processes; the cache may hold a key deleted elsewhere.
            Some(dir) => key.file = Some(dir.store(name, &key)?),
            None if keys.contains_key(name) => return Err(KeystoreError::KeyExists),
            None => {}
        }
        keys.insert(name.clone(), Arc::new(key));
        Ok(())
    }
}

/// Seals `plaintext` under the key's sealing version with its scheme, in software; returns
/// the version with the ciphertext.
fn seal(key: &SoftKey, plaintext: &[u8], context: &[u8]) -> Result<(u32, Vec<u8>)> {
    let (version, master) = key.sealing();
    let inner = seal_with(key, master, plaintext, context)?;
    Ok((version, crypto::versioned::wrap(version, inner)))
}

fn seal_with(key: &SoftKey, master: &Key32, plaintext: &[u8], context: &[u8]) -> Result<Vec<u8>> {
    Ok(match key.info.scheme {
        Scheme::Gcm => native::seal_gcm_soft(
            master,
            &*secret::random::<12>().map_err(rng_error)?,
            plaintext,
            context,
        ),
        Scheme::Kwp => native::seal_kwp_soft(master, plaintext, context),
        Scheme::Kes => {
            let iv = secret::random::<{ kes::IV_LEN }>().map_err(rng_error)?;
            let nonce = secret::random::<{ kes::NONCE_LEN }>().map_err(rng_error)?;
            let derived = kes::derive_soft(key.info.algorithm, master, &iv);
            kes::seal(
                key.info.algorithm,
                &derived,
                &iv,
                &nonce,
                plaintext,
                context,
            )
        }
    })
}

fn open_with(
    key: &SoftKey,
    master: &Key32,
    ciphertext: &[u8],
    context: &[u8],
) -> Result<SecretBytes> {
    Ok(match key.info.scheme {
        Scheme::Gcm => native::open_gcm_soft(master, ciphertext, context)?,
        Scheme::Kwp => native::open_kwp_soft(master, ciphertext, context)?,
        Scheme::Kes => {
            let parts = kes::parse(ciphertext)?;
            let derived = kes::derive_soft(key.info.algorithm, master, &parts.iv);
            kes::open(key.info.algorithm, &derived, &parts, context)?
        }
    })
}

#[async_trait::async_trait]
impl KeyStore for SoftKeyStore {
    fn description(&self) -> String {
        match &self.dir {
            Some(d) => format!("soft keystore in {} (KEK-wrapped files)", d.path.display()),
            None => "soft keystore in memory (keys are lost on exit)".to_owned(),
        }
    }

    async fn create(&self, name: &KeyName, provenance: Provenance) -> Result<()> {
        let key = SoftKey {
            info: KeyInfo {
                name: name.clone(),
                scheme: self.scheme,
                algorithm: Algorithm::Aes256,
                created_at: provenance.created_at,
                created_by: provenance.created_by,
                version: 1,
            },
            master: secret::random::<32>().map_err(rng_error)?,
            hmac: Some(secret::random::<32>().map_err(rng_error)?),
            file: None,
            versions: Vec::new(),
        };
        self.insert(name, key)
    }

    async fn import(&self, name: &KeyName, import: ImportKey) -> Result<()> {
        if import.scheme != Scheme::Kes && import.algorithm != Algorithm::Aes256 {
            return Err(KeystoreError::InvalidInput(
                SoftError::SchemeTakesAes256(import.scheme).into(),
            ));
        }
        let hmac = match import.hmac {
            HmacKeySource::Generate => Some(secret::random::<32>().map_err(rng_error)?),
            HmacKeySource::Given(k) => Some(k),
            HmacKeySource::None => None,
        };
        let key = SoftKey {
            info: KeyInfo {
                name: name.clone(),
                scheme: import.scheme,
                algorithm: import.algorithm,
                created_at: import.provenance.created_at,
                created_by: import.provenance.created_by,
                version: 1,
            },
            master: import.key,
            hmac,
            file: None,
            versions: Vec::new(),
        };
        self.insert(name, key)
    }

    async fn describe(&self, name: &KeyName) -> Result<KeyInfo> {
        Ok(self.key(name)?.info.clone())
    }

    async fn list(&self, prefix: &str) -> Result<Vec<KeyName>> {
        if let Some(dir) = &self.dir {
            let mut names = dir.names()?;
            names.retain(|k| k.as_str().starts_with(prefix));
            return Ok(names);
        }
        let keys = self.keys.read().ignore_poison();
        Ok(keys
            .keys()
            .filter(|k| k.as_str().starts_with(prefix))
            .cloned()
            .collect())
    }

    async fn delete(&self, name: &KeyName) -> Result<()> {
        let mut keys = self.keys.write().ignore_poison();
        let existed = match &self.dir {
            Some(dir) => dir.remove(name)?,
            None => keys.contains_key(name),
        };
        keys.remove(name);
        self.usage.forget(name);
        if existed {
            Ok(())
        } else {
            Err(KeystoreError::KeyNotFound)
        }
    }

    async fn generate(&self, name: &KeyName, context: &[u8]) -> Result<DataKey> {
        let key = self.key(name)?;
        let plaintext = secret::random::<32>().map_err(rng_error)?;
        let (version, ciphertext) = seal(&key, plaintext.as_ref(), context)?;
        self.usage.sealed(name, version);
        Ok(DataKey {
            plaintext,
            ciphertext,
        })
    }

    async fn encrypt(&self, name: &KeyName, plaintext: &[u8], context: &[u8]) -> Result<Vec<u8>> {
        let (version, ct) = seal(&*self.key(name)?, plaintext, context)?;
        self.usage.sealed(name, version);
        Ok(ct)
    }

    async fn decrypt(
        &self,
        name: &KeyName,
        ciphertext: &[u8],
        context: &[u8],
    ) -> Result<SecretBytes> {
        for (version, inner) in crypto::versioned::readings(ciphertext) {
            let key = self.key_for(name, Some(version))?;
            let Some(master) = key.version(version) else {
                continue;
            };
            if let Ok(pt) = open_with(&key, master, inner, context) {
                self.usage.unsealed(name, version);
                return Ok(pt);
            }
        }
        Err(KeystoreError::NotAuthentic)
    }

    async fn rotate(&self, name: &KeyName, provenance: Provenance) -> Result<u32> {
        self.add_version(name, None, provenance)
            .map(|v| v.expect("an unconditional rotation makes a version"))
    }

    async fn rotate_if_due(
        &self,
        name: &KeyName,
        period: Duration,
        provenance: Provenance,
    ) -> Result<ScheduledRotation> {
        Ok(self.add_version(name, Some(period), provenance)?.into())
    }

    async fn versions(&self, name: &KeyName) -> Result<Vec<VersionInfo>> {
        let key = self.key(name)?;
        Ok(self.usage.listing(name, key.version_times()))
    }

    async fn destroy_version(&self, name: &KeyName, version: u32) -> Result<()> {
        let key = self.key_for(name, Some(version))?;
        super::check_destroy(&key.version_times(), version)?;
        if let Some(dir) = &self.dir {
            dir.remove_version(name, version)?;
        }
        // Read, change and store under the lock, so a rotation in between is not undone.
        let mut keys = self.keys.write().ignore_poison();
        if let Some(current) = keys.get(name) {
            let mut fresh = (**current).clone();
            let rest = fresh
                .versions
                .iter()
                .filter(|v| v.version != version)
                .cloned()
                .collect();
            fresh.set_versions(rest);
            keys.insert(name.clone(), Arc::new(fresh));
        }
        Ok(())
    }

    fn version_usage(&self) -> Vec<super::usage::VersionUsage> {
        self.usage.snapshot()
    }

    async fn hmac(&self, name: &KeyName, message: &[u8]) -> Result<[u8; 32]> {
        let key = self.key(name)?;
        let hmac_key = key.hmac.as_ref().ok_or(KeystoreError::HmacUnsupported)?;
        Ok(crypto::hmac_sha256(hmac_key.as_ref(), message))
    }

    fn stats(&self) -> KeystoreStats {
        KeystoreStats {
            unreadable_key_files: self.dir.as_ref().map(KeyDir::unreadable),
            ..KeystoreStats::default()
        }
    }

    async fn status(&self) -> Result<Duration> {
        let start = Instant::now();
        if let Some(dir) = &self.dir {
            std::fs::metadata(&dir.path).map_err(|source| {
                KeystoreError::Unreachable(
                    SoftError::Directory {
                        path: dir.path.clone(),
                        source,
                    }
                    .into(),
                )
            })?;
        }
        Ok(start.elapsed())
    }
}

/// A directory of key files, each `KWP(kek, record)` (docs/FORMAT.md §7).
struct KeyDir {
    path: PathBuf,
    kek: Key32,
    /// Names of `*.key` files found unusable (unreadable, not opening, misnamed) and not since
    /// read successfully or removed: the gauge operators alert on.
    bad_files: Mutex<BTreeSet<String>>,
}

/// Temp files younger than this may be another process's create in progress.
const STALE_TEMP_AGE: Duration = Duration::from_secs(60);
const TEMP_PREFIX: &str = ".tmp-";

const RECORD_VERSION: u8 = 1;
/// The record of a key version file (version 2 and up).
const VERSION_RECORD: u8 = 2;
const FILE_SUFFIX: &str = ".key";
/// `<name>.v<N>`: key names cannot hold `.`, so no key file or other key's version matches.
const VERSION_INFIX: &str = ".v";

enum VersionFileProblem {
    /// The file belongs to an earlier key of the same name.
    OtherKey,
    Unusable(KeystoreError),
}

fn io_error(what: &'static str, path: &Path, source: std::io::Error) -> KeystoreError {
    KeystoreError::Backend(
        SoftError::Io {
            what,
            path: path.to_owned(),
            source,
        }
        .into(),
    )
}

fn scheme_id(s: Scheme) -> u8 {
    match s {
        Scheme::Gcm => 1,
        Scheme::Kwp => 2,
        Scheme::Kes => 3,
    }
}

impl KeyDir {
    fn open(path: &Path, kek_file: &Path) -> Result<Self> {
        check_kek_file_mode(kek_file)?;
        let text = Zeroizing::new(
            std::fs::read_to_string(kek_file)
                .map_err(|e| io_error("cannot read KEK file", kek_file, e))?,
        );
        let kek = parse_kek(text.trim()).ok_or_else(|| {
            KeystoreError::InvalidInput(SoftError::KekFormat(kek_file.to_owned()).into())
        })?;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(path)
            .map_err(|e| io_error("cannot create key directory", path, e))?;
        if let Ok(m) = std::fs::metadata(path) {
            if m.permissions().mode() & 0o007 != 0 {
                tracing::warn!(
                    dir = %path.display(),
                    mode = format!("{:o}", m.permissions().mode() & 0o777),
                    "the key directory is open to other users: `chmod 700` it (the files are wrapped under the KEK, but their names and number show)"
                );
            }
        }
        Ok(KeyDir {
            path: path.to_owned(),
            kek,
            bad_files: Mutex::new(BTreeSet::new()),
        })
    }

    fn file(&self, name: &KeyName) -> PathBuf {
        self.path.join(format!("{name}{FILE_SUFFIX}"))
    }

    fn unreadable(&self) -> u64 {
        self.bad_files.lock().ignore_poison().len() as u64
    }

    /// Records a file as unusable (logged the first time) or as fine again.
    fn mark(&self, file_name: &str, problem: Option<&KeystoreError>) {
        let mut bad = self.bad_files.lock().ignore_poison();
        match problem {
            Some(e) => {
                if bad.insert(file_name.to_owned()) {
                    tracing::error!(dir = %self.path.display(), file = file_name, error = %e, "skipping a key file that cannot be used");
                }
            }
            None => {
                bad.remove(file_name);
            }
        }
    }

    /// Removes `.tmp-*` files a crashed create left behind; young ones may be another
    /// process's create in progress and stay.
    fn remove_stale_temp_files(&self) {
        let Ok(entries) = std::fs::read_dir(&self.path) else {
            return;
        };
        let now = SystemTime::now();
        for entry in entries.flatten() {
            let stale = entry
                .file_name()
                .to_str()
                .is_some_and(|n| n.starts_with(TEMP_PREFIX))
                && entry
                    .metadata()
                    .and_then(|m| m.modified())
                    .is_ok_and(|t| now.duration_since(t).is_ok_and(|age| age >= STALE_TEMP_AGE));
            if stale && std::fs::remove_file(entry.path()).is_ok() {
                tracing::info!(file = %entry.path().display(), "removed a temp file left by an interrupted create");
            }
        }
    }

    /// The key names of the directory's `*.key` files, sorted; misnamed files are marked.
    fn names(&self) -> Result<Vec<KeyName>> {
        let entries = std::fs::read_dir(&self.path)
            .map_err(|e| io_error("cannot read key directory", &self.path, e))?;
        let mut names = Vec::new();
        let mut seen = BTreeSet::new();
        for entry in entries {
            let entry = entry.map_err(|e| io_error("cannot read key directory", &self.path, e))?;
            let file_name = entry.file_name();
            let Some(file_name) = file_name.to_str() else {
                continue;
            };
            let Some(stem) = file_name.strip_suffix(FILE_SUFFIX) else {
                continue;
            };
            seen.insert(file_name.to_owned());
            match KeyName::new(stem) {
                Ok(name) => names.push(name),
                Err(_) => self.mark(
                    file_name,
                    Some(&KeystoreError::Backend(SoftError::FileName.into())),
                ),
            }
        }
        // Files marked bad that are gone no longer count.
        self.bad_files
            .lock()
            .ignore_poison()
            .retain(|f| seen.contains(f));
        names.sort();
        Ok(names)
    }

    fn load_all(&self) -> Result<BTreeMap<KeyName, Arc<SoftKey>>> {
        let names = self.names()?;
        // One pass over the directory for every key's versions, not one per key.
        let mut versions = self.all_version_numbers()?;
        let mut keys = BTreeMap::new();
        let mut failures = 0usize;
        for name in names {
            let numbers = versions.remove(name.as_str()).unwrap_or_default();
            match self.load_with(&name, Some(numbers)) {
                Ok(Some(key)) => {
                    keys.insert(name, Arc::new(key));
                }
                Ok(None) => {}
                Err(_) => failures += 1,
            }
        }
        if failures > 0 && keys.is_empty() {
            return Err(KeystoreError::InvalidInput(
                SoftError::WrongKek {
                    failures,
                    dir: self.path.clone(),
                }
                .into(),
            ));
        }
        Ok(keys)
    }

    /// The file's identity, `None` when there is no file for `name`.
    fn file_id(&self, name: &KeyName) -> Result<Option<FileId>> {
        let path = self.file(name);
        match std::fs::metadata(&path) {
            Ok(m) => Ok(Some(FileId::of(&m))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io_error("cannot read key file", &path, e)),
        }
    }

    /// Reads and opens one key file and its versions' files; problems with the key file are
    /// marked against it and returned.
    fn load(&self, name: &KeyName) -> Result<Option<SoftKey>> {
        self.load_with(name, None)
    }

    /// [`Self::load`] with the key's version numbers when already known.
    fn load_with(&self, name: &KeyName, numbers: Option<Vec<u32>>) -> Result<Option<SoftKey>> {
        let file_name = format!("{name}{FILE_SUFFIX}");
        let loaded = self.read_key(name).and_then(|key| match key {
            Some(mut key) => {
                let numbers = match numbers {
                    Some(n) => n,
                    None => self.version_numbers(name)?,
                };
                let versions = self.load_versions(name, &key, numbers)?;
                key.set_versions(versions);
                Ok(Some(key))
            }
            None => Ok(None),
        });
        match &loaded {
            Ok(Some(_)) => self.mark(&file_name, None),
            Ok(None) => {}
            Err(e) => self.mark(&file_name, Some(e)),
        }
        loaded
    }

    fn read_key(&self, name: &KeyName) -> Result<Option<SoftKey>> {
        use std::io::Read;
        let path = self.file(name);
        let mut file = match std::fs::File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io_error("cannot read key file", &path, e)),
        };
        // The identity of the file actually read, not of whatever the name points at later.
        let id = file
            .metadata()
            .map(|m| FileId::of(&m))
            .map_err(|e| io_error("cannot read key file", &path, e))?;
        let mut wrapped = Vec::new();
        file.read_to_end(&mut wrapped)
            .map_err(|e| io_error("cannot read key file", &path, e))?;
        let kek = aes_kw::KekAes256::from(*self.kek);
        let record = Zeroizing::new(kek.unwrap_with_padding_vec(&wrapped).map_err(|_| {
            KeystoreError::Backend(SoftError::KeyFileNotOpening(path.clone()).into())
        })?);
        let mut key = decode_record(&record, name).ok_or_else(|| {
            KeystoreError::Backend(SoftError::KeyFileMalformed(path.clone()).into())
        })?;
        key.file = Some(id);
        Ok(Some(key))
    }

    /// Writes the key exclusively: a temporary file, fsynced, then hard-linked to its name, so
    /// a reader never sees a partial file and two writers cannot both win.
    fn store(&self, name: &KeyName, key: &SoftKey) -> Result<FileId> {
        self.store_record(&encode_record(key), &self.file(name), name)
    }

    fn store_record(&self, record: &[u8], target: &Path, name: &KeyName) -> Result<FileId> {
        use std::io::Write;
        let kek = aes_kw::KekAes256::from(*self.kek);
        let wrapped = kek
            .wrap_with_padding_vec(record)
            .map_err(|e| KeystoreError::Backend(SoftError::Wrap(e).into()))?;
        let suffix = hex::encode(*secret::random::<8>().map_err(rng_error)?);
        let tmp = self.path.join(format!("{TEMP_PREFIX}{name}-{suffix}"));
        let result = (|| {
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode_0600()
                .open(&tmp)
                .map_err(|e| io_error("cannot write key file", &tmp, e))?;
            f.write_all(&wrapped)
                .and_then(|()| f.sync_all())
                .map_err(|e| io_error("cannot write key file", &tmp, e))?;
            match std::fs::hard_link(&tmp, target) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                    return Err(KeystoreError::KeyExists)
                }
                Err(e) => return Err(io_error("cannot commit key file", target, e)),
            }
            sync_dir(&self.path);
            Ok(())
        })();
        let _ = std::fs::remove_file(&tmp);
        // Linking and unlinking changed the inode's change time: read the identity last.
        result?;
        std::fs::metadata(target)
            .map(|m| FileId::of(&m))
            .map_err(|e| io_error("cannot read key file", target, e))
    }

    fn version_file(&self, name: &KeyName, version: u32) -> PathBuf {
        self.path.join(format!("{name}{VERSION_INFIX}{version}"))
    }

    /// The identity of a version's file, `None` when there is none.
    fn version_file_id(&self, name: &KeyName, version: u32) -> Result<Option<FileId>> {
        let path = self.version_file(name, version);
        match std::fs::metadata(&path) {
            Ok(m) => Ok(Some(FileId::of(&m))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io_error("cannot read key version file", &path, e)),
        }
    }

    /// The version numbers (2 and up) that have a file for `name`.
    fn version_numbers(&self, name: &KeyName) -> Result<Vec<u32>> {
        Ok(self
            .all_version_numbers()?
            .remove(name.as_str())
            .unwrap_or_default())
    }

    /// Every version file in the directory: key name → version numbers (2 and up), sorted.
    fn all_version_numbers(&self) -> Result<std::collections::HashMap<String, Vec<u32>>> {
        let entries = std::fs::read_dir(&self.path)
            .map_err(|e| io_error("cannot read key directory", &self.path, e))?;
        let mut out: std::collections::HashMap<String, Vec<u32>> = Default::default();
        for entry in entries.flatten() {
            let file_name = entry.file_name();
            let Some((name, n)) = file_name
                .to_str()
                .and_then(|f| f.rsplit_once(VERSION_INFIX))
                .filter(|(_, n)| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
                .and_then(|(name, n)| Some((name, n.parse::<u32>().ok()?)))
            else {
                continue;
            };
            if n >= 2 && !name.starts_with(TEMP_PREFIX) {
                out.entry(name.to_owned()).or_default().push(n);
            }
        }
        for numbers in out.values_mut() {
            numbers.sort_unstable();
        }
        Ok(out)
    }

    /// Reads the key's version files. A file of an older key of the same name (an
    /// interrupted delete's) is removed; one that cannot be read is logged and skipped.
    fn load_versions(
        &self,
        name: &KeyName,
        base: &SoftKey,
        numbers: Vec<u32>,
    ) -> Result<Vec<SoftVersion>> {
        let mut out = Vec::new();
        for n in numbers {
            let path = self.version_file(name, n);
            match self.read_version(&path, name, base, n) {
                Ok(Some(v)) => out.push(v),
                Ok(None) => {}
                Err(VersionFileProblem::OtherKey) => {
                    if std::fs::remove_file(&path).is_ok() {
                        tracing::info!(file = %path.display(), "removed a version file of a deleted key");
                    }
                }
                Err(VersionFileProblem::Unusable(e)) => {
                    tracing::error!(file = %path.display(), error = %e, "skipping a key version file that cannot be used");
                }
            }
        }
        Ok(out)
    }

    fn read_version(
        &self,
        path: &Path,
        name: &KeyName,
        base: &SoftKey,
        version: u32,
    ) -> std::result::Result<Option<SoftVersion>, VersionFileProblem> {
        use std::io::Read;
        let mut file = match std::fs::File::open(path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => {
                return Err(VersionFileProblem::Unusable(io_error(
                    "cannot read key version file",
                    path,
                    e,
                )))
            }
        };
        let unusable = |why: &str| {
            VersionFileProblem::Unusable(KeystoreError::Backend(
                SoftError::VersionFile {
                    path: path.to_owned(),
                    why: why.to_owned(),
                }
                .into(),
            ))
        };
        let id = file
            .metadata()
            .map(|m| FileId::of(&m))
            .map_err(|_| unusable("cannot stat"))?;
        let mut wrapped = Vec::new();
        file.read_to_end(&mut wrapped)
            .map_err(|_| unusable("cannot read"))?;
        let kek = aes_kw::KekAes256::from(*self.kek);
        let record = Zeroizing::new(
            kek.unwrap_with_padding_vec(&wrapped)
                .map_err(|_| unusable("does not open under the KEK"))?,
        );
        let (key_created, mut v) =
            decode_version_record(&record, name).ok_or_else(|| unusable("malformed"))?;
        if v.version != version {
            return Err(unusable("holds another version number"));
        }
        if key_created != base.info.created_at {
            return Err(VersionFileProblem::OtherKey);
        }
        v.file = Some(id);
        Ok(Some(v))
    }

    /// Writes a new version's file exclusively; `KeyExists` when that version exists.
    fn store_version(&self, name: &KeyName, base: &SoftKey, v: &SoftVersion) -> Result<FileId> {
        let record = encode_version_record(base, v);
        self.store_record(&record, &self.version_file(name, v.version), name)
    }

    fn remove_version(&self, name: &KeyName, version: u32) -> Result<()> {
        let path = self.version_file(name, version);
        match std::fs::remove_file(&path) {
            Ok(()) => {
                sync_dir(&self.path);
                Ok(())
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                Err(KeystoreError::VersionNotFound)
            }
            Err(e) => Err(io_error("cannot delete key version file", &path, e)),
        }
    }

    /// Removes the key's file, then its version files; `false` if there was no key file.
    /// The key file goes first: that is the commit point, as for a create.
    fn remove(&self, name: &KeyName) -> Result<bool> {
        let path = self.file(name);
        let removed = self.remove_key_file(&path)?;
        for n in self.version_numbers(name)? {
            let _ = std::fs::remove_file(self.version_file(name, n));
        }
        Ok(removed)
    }

    fn remove_key_file(&self, path: &Path) -> Result<bool> {
        match std::fs::remove_file(path) {
            Ok(()) => {
                sync_dir(&self.path);
                Ok(true)
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(io_error("cannot delete key file", path, e)),
        }
    }
}

trait Mode0600 {
    fn mode_0600(&mut self) -> &mut Self;
}

impl Mode0600 for std::fs::OpenOptions {
    fn mode_0600(&mut self) -> &mut Self {
        use std::os::unix::fs::OpenOptionsExt;
        self.mode(0o600)
    }
}

fn sync_dir(path: &Path) {
    // Best effort: the link is durable once the directory is; failure only weakens crash safety.
    if let Ok(d) = std::fs::File::open(path) {
        let _ = d.sync_all();
    }
}

/// Refuses a KEK file other users can read or write: whoever reads it opens every key file.
/// Group read stays allowed (`root:kesh 0640` is the layout docs/install.md gives).
fn check_kek_file_mode(kek_file: &Path) -> Result<()> {
    let m =
        std::fs::metadata(kek_file).map_err(|e| io_error("cannot read KEK file", kek_file, e))?;
    let mode = m.permissions().mode() & 0o777;
    if mode & 0o007 != 0 {
        return Err(KeystoreError::InvalidInput(
            SoftError::KekMode {
                path: kek_file.to_owned(),
                mode,
            }
            .into(),
        ));
    }
    if mode & 0o020 != 0 {
        tracing::warn!(file = %kek_file.display(), mode = format!("{mode:o}"), "the KEK file is writable by its group");
    }
    Ok(())
}

fn parse_kek(text: &str) -> Option<Key32> {
    use base64::Engine;
    let bytes = Zeroizing::new(if text.len() == 64 {
        hex::decode(text).ok()?
    } else {
        base64::engine::general_purpose::STANDARD
            .decode(text)
            .ok()?
    });
    let mut key = Zeroizing::new([0u8; 32]);
    key.copy_from_slice(bytes.get(..32).filter(|_| bytes.len() == 32)?);
    Some(key)
}

/// `version | scheme | algorithm | has_hmac | key(32) | hmac(32) | created_at_ns(i128 BE) |
/// name_len | name | created_by`
fn encode_record(key: &SoftKey) -> Zeroizing<Vec<u8>> {
    let info = &key.info;
    let mut out = Zeroizing::new(Vec::with_capacity(128 + info.created_by.len()));
    out.push(RECORD_VERSION);
    out.push(scheme_id(info.scheme));
    out.push(match info.algorithm {
        Algorithm::Aes256 => 1,
        Algorithm::ChaCha20 => 2,
    });
    out.push(u8::from(key.hmac.is_some()));
    out.extend_from_slice(key.master.as_ref());
    out.extend_from_slice(key.hmac.as_deref().unwrap_or(&[0u8; 32]));
    out.extend_from_slice(&info.created_at.unix_timestamp_nanos().to_be_bytes());
    // Names are at most 80 bytes, so the length fits a byte.
    out.push(info.name.as_str().len() as u8);
    out.extend_from_slice(info.name.as_str().as_bytes());
    out.extend_from_slice(info.created_by.as_bytes());
    out
}

fn decode_record(rec: &[u8], expected: &KeyName) -> Option<SoftKey> {
    let (&[version, scheme, alg, has_hmac], rest) = rec.split_first_chunk::<4>()?;
    if version != RECORD_VERSION {
        return None;
    }
    let scheme = match scheme {
        1 => Scheme::Gcm,
        2 => Scheme::Kwp,
        3 => Scheme::Kes,
        _ => return None,
    };
    let algorithm = match alg {
        1 => Algorithm::Aes256,
        2 => Algorithm::ChaCha20,
        _ => return None,
    };
    let (master, rest) = rest.split_first_chunk::<32>()?;
    let (hmac, rest) = rest.split_first_chunk::<32>()?;
    let (created, rest) = rest.split_first_chunk::<16>()?;
    let (&name_len, rest) = rest.split_first()?;
    let (name, created_by) = rest.split_at_checked(usize::from(name_len))?;
    // The name inside the record must match the file: a renamed file is not another key.
    if name != expected.as_str().as_bytes() {
        return None;
    }
    Some(SoftKey {
        info: KeyInfo {
            name: expected.clone(),
            scheme,
            algorithm,
            created_at: OffsetDateTime::from_unix_timestamp_nanos(i128::from_be_bytes(*created))
                .ok()?,
            created_by: String::from_utf8(created_by.to_vec()).ok()?,
            version: 1,
        },
        master: Zeroizing::new(*master),
        hmac: (has_hmac == 1).then(|| Zeroizing::new(*hmac)),
        file: None,
        versions: Vec::new(),
    })
}

/// `2 | key's created_at_ns(i128 BE) | version(u32 BE) | version's created_at_ns(i128 BE) |
/// key(32) | name_len | name | created_by`. The scheme and algorithm are the key's.
fn encode_version_record(base: &SoftKey, v: &SoftVersion) -> Zeroizing<Vec<u8>> {
    let mut out = Zeroizing::new(Vec::with_capacity(128 + v.created_by.len()));
    out.push(VERSION_RECORD);
    out.extend_from_slice(&base.info.created_at.unix_timestamp_nanos().to_be_bytes());
    out.extend_from_slice(&v.version.to_be_bytes());
    out.extend_from_slice(&v.created_at.unix_timestamp_nanos().to_be_bytes());
    out.extend_from_slice(v.master.as_ref());
    out.push(base.info.name.as_str().len() as u8);
    out.extend_from_slice(base.info.name.as_str().as_bytes());
    out.extend_from_slice(v.created_by.as_bytes());
    out
}

/// The key's creation time the version file names, and the version.
fn decode_version_record(rec: &[u8], expected: &KeyName) -> Option<(OffsetDateTime, SoftVersion)> {
    let (&kind, rest) = rec.split_first()?;
    if kind != VERSION_RECORD {
        return None;
    }
    let (key_created, rest) = rest.split_first_chunk::<16>()?;
    let (version, rest) = rest.split_first_chunk::<4>()?;
    let (created, rest) = rest.split_first_chunk::<16>()?;
    let (master, rest) = rest.split_first_chunk::<32>()?;
    let (&name_len, rest) = rest.split_first()?;
    let (name, created_by) = rest.split_at_checked(usize::from(name_len))?;
    if name != expected.as_str().as_bytes() {
        return None;
    }
    let time =
        |b: &[u8; 16]| OffsetDateTime::from_unix_timestamp_nanos(i128::from_be_bytes(*b)).ok();
    Some((
        time(key_created)?,
        SoftVersion {
            version: u32::from_be_bytes(*version),
            created_at: time(created)?,
            created_by: String::from_utf8(created_by.to_vec()).ok()?,
            master: Zeroizing::new(*master),
            file: None,
        },
    ))
}
