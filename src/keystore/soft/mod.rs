//! The embedded keystore: every scheme in software, for `--dev` and machines without an HSM.
//!
//! Keys live in memory, optionally backed by a directory where each key is one file holding
//! its record wrapped with AES-KWP under a key-encryption key read from a file. Produces the
//! same bytes as the pkcs11 keystore for the same key and IV (`docs/FORMAT.md`).
//!
//! The directory store is for one kesh process: creates are exclusive across processes
//! (hard-link commit), but a delete made by another process is not noticed until restart.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use time::OffsetDateTime;
use zeroize::Zeroizing;

use super::{
    DataKey, HmacKeySource, ImportKey, KeyInfo, KeyStore, KeystoreError, Provenance, Result, Scheme,
};
use crate::crypto::{self, kes, kes::Algorithm, native};
use crate::name::KeyName;
use crate::secret::{self, Key32, SecretBytes};

/// One key: its public facts and its secrets.
struct SoftKey {
    info: KeyInfo,
    master: Key32,
    hmac: Option<Key32>,
}

pub struct SoftKeyStore {
    keys: RwLock<BTreeMap<KeyName, Arc<SoftKey>>>,
    dir: Option<KeyDir>,
    scheme: Scheme,
}

impl std::fmt::Debug for SoftKeyStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SoftKeyStore")
            .field("dir", &self.dir.as_ref().map(|d| &d.path))
            .finish_non_exhaustive()
    }
}

fn rng_error(e: getrandom::Error) -> KeystoreError {
    KeystoreError::Backend(format!("random number generator failed: {e}"))
}

impl SoftKeyStore {
    /// An empty store that forgets everything on exit.
    pub fn in_memory() -> Self {
        SoftKeyStore {
            keys: RwLock::new(BTreeMap::new()),
            dir: None,
            scheme: Scheme::Gcm,
        }
    }

    /// A store backed by `path`, one wrapped file per key, under the KEK in `kek_file`
    /// (32 bytes as base64 or hex text). Refuses to start if any key file cannot be read.
    pub fn open_dir(path: &Path, kek_file: &Path) -> Result<Self> {
        let dir = KeyDir::open(path, kek_file)?;
        let keys = dir.load_all()?;
        Ok(SoftKeyStore {
            keys: RwLock::new(keys),
            dir: Some(dir),
            scheme: Scheme::Gcm,
        })
    }

    /// The scheme for keys made by `create`.
    pub fn with_scheme(mut self, scheme: Scheme) -> Self {
        self.scheme = scheme;
        self
    }

    fn key(&self, name: &KeyName) -> Result<Arc<SoftKey>> {
        // A poisoned lock means a panic mid-update of a map of Arcs: the map itself is intact.
        let found = self
            .keys
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(name)
            .cloned();
        match found {
            Some(k) => Ok(k),
            None => {
                // Another process may have created it in the shared directory.
                let dir = self.dir.as_ref().ok_or(KeystoreError::KeyNotFound)?;
                let key = Arc::new(dir.load(name)?.ok_or(KeystoreError::KeyNotFound)?);
                self.keys
                    .write()
                    .unwrap_or_else(|e| e.into_inner())
                    .insert(name.clone(), key.clone());
                Ok(key)
            }
        }
    }

    fn insert(&self, name: &KeyName, key: SoftKey) -> Result<()> {
        let mut keys = self.keys.write().unwrap_or_else(|e| e.into_inner());
        if keys.contains_key(name) {
            return Err(KeystoreError::KeyExists);
        }
        if let Some(dir) = &self.dir {
            dir.store(name, &key)?;
        }
        keys.insert(name.clone(), Arc::new(key));
        Ok(())
    }
}

/// Seals `plaintext` under `key` with its scheme, in software.
fn seal(key: &SoftKey, plaintext: &[u8], context: &[u8]) -> Result<Vec<u8>> {
    Ok(match key.info.scheme {
        Scheme::Gcm => native::seal_gcm_soft(
            &key.master,
            &*secret::random::<12>().map_err(rng_error)?,
            plaintext,
            context,
        ),
        Scheme::Kwp => native::seal_kwp_soft(&key.master, plaintext, context),
        Scheme::Kes => {
            let iv = secret::random::<{ kes::IV_LEN }>().map_err(rng_error)?;
            let nonce = secret::random::<{ kes::NONCE_LEN }>().map_err(rng_error)?;
            let derived = kes::derive_soft(key.info.algorithm, &key.master, &iv);
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

fn open(key: &SoftKey, ciphertext: &[u8], context: &[u8]) -> Result<SecretBytes> {
    Ok(match key.info.scheme {
        Scheme::Gcm => native::open_gcm_soft(&key.master, ciphertext, context)?,
        Scheme::Kwp => native::open_kwp_soft(&key.master, ciphertext, context)?,
        Scheme::Kes => {
            let parts = kes::parse(ciphertext)?;
            let derived = kes::derive_soft(key.info.algorithm, &key.master, &parts.iv);
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
            },
            master: secret::random::<32>().map_err(rng_error)?,
            hmac: Some(secret::random::<32>().map_err(rng_error)?),
        };
        self.insert(name, key)
    }

    async fn import(&self, name: &KeyName, import: ImportKey) -> Result<()> {
        if import.scheme != Scheme::Kes && import.algorithm != Algorithm::Aes256 {
            return Err(KeystoreError::InvalidInput(format!(
                "the {} scheme takes AES256 keys only",
                import.scheme
            )));
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
            },
            master: import.key,
            hmac,
        };
        self.insert(name, key)
    }

    async fn describe(&self, name: &KeyName) -> Result<KeyInfo> {
        Ok(self.key(name)?.info.clone())
    }

    async fn list(&self, prefix: &str) -> Result<Vec<KeyName>> {
        let keys = self.keys.read().unwrap_or_else(|e| e.into_inner());
        Ok(keys
            .keys()
            .filter(|k| k.as_str().starts_with(prefix))
            .cloned()
            .collect())
    }

    async fn delete(&self, name: &KeyName) -> Result<()> {
        let mut keys = self.keys.write().unwrap_or_else(|e| e.into_inner());
        let in_memory = keys.contains_key(name);
        if let Some(dir) = &self.dir {
            if !dir.remove(name)? && !in_memory {
                return Err(KeystoreError::KeyNotFound);
            }
        } else if !in_memory {
            return Err(KeystoreError::KeyNotFound);
        }
        keys.remove(name);
        Ok(())
    }

    async fn generate(&self, name: &KeyName, context: &[u8]) -> Result<DataKey> {
        let key = self.key(name)?;
        let plaintext = secret::random::<32>().map_err(rng_error)?;
        let ciphertext = seal(&key, plaintext.as_ref(), context)?;
        Ok(DataKey {
            plaintext,
            ciphertext,
        })
    }

    async fn encrypt(&self, name: &KeyName, plaintext: &[u8], context: &[u8]) -> Result<Vec<u8>> {
        seal(&*self.key(name)?, plaintext, context)
    }

    async fn decrypt(
        &self,
        name: &KeyName,
        ciphertext: &[u8],
        context: &[u8],
    ) -> Result<SecretBytes> {
        open(&*self.key(name)?, ciphertext, context)
    }

    async fn hmac(&self, name: &KeyName, message: &[u8]) -> Result<[u8; 32]> {
        let key = self.key(name)?;
        let hmac_key = key.hmac.as_ref().ok_or(KeystoreError::HmacUnsupported)?;
        Ok(crypto::hmac_sha256(hmac_key.as_ref(), message))
    }

    async fn status(&self) -> Result<Duration> {
        let start = Instant::now();
        if let Some(dir) = &self.dir {
            std::fs::metadata(&dir.path).map_err(|e| {
                KeystoreError::Unreachable(format!("key directory {}: {e}", dir.path.display()))
            })?;
        }
        Ok(start.elapsed())
    }
}

/// A directory of key files, each `KWP(kek, record)` (`docs/FORMAT.md` §5).
struct KeyDir {
    path: PathBuf,
    kek: Key32,
}

const RECORD_VERSION: u8 = 1;
const FILE_SUFFIX: &str = ".key";

fn io_error(what: &str, path: &Path, e: std::io::Error) -> KeystoreError {
    KeystoreError::Backend(format!("{what} {}: {e}", path.display()))
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
        let text = Zeroizing::new(
            std::fs::read_to_string(kek_file)
                .map_err(|e| io_error("cannot read KEK file", kek_file, e))?,
        );
        let kek = parse_kek(text.trim()).ok_or_else(|| {
            KeystoreError::InvalidInput(format!(
                "KEK file {} must hold 32 bytes as base64 (44 characters) or hex (64 characters)",
                kek_file.display()
            ))
        })?;
        std::fs::create_dir_all(path)
            .map_err(|e| io_error("cannot create key directory", path, e))?;
        Ok(KeyDir {
            path: path.to_owned(),
            kek,
        })
    }

    fn file(&self, name: &KeyName) -> PathBuf {
        self.path.join(format!("{name}{FILE_SUFFIX}"))
    }

    fn load_all(&self) -> Result<BTreeMap<KeyName, Arc<SoftKey>>> {
        let mut keys = BTreeMap::new();
        let entries = std::fs::read_dir(&self.path)
            .map_err(|e| io_error("cannot read key directory", &self.path, e))?;
        for entry in entries {
            let entry = entry.map_err(|e| io_error("cannot read key directory", &self.path, e))?;
            let file_name = entry.file_name();
            let Some(stem) = file_name.to_str().and_then(|n| n.strip_suffix(FILE_SUFFIX)) else {
                continue;
            };
            let name = KeyName::new(stem).map_err(|_| {
                KeystoreError::Backend(format!(
                    "key file {} has an invalid key name",
                    entry.path().display()
                ))
            })?;
            if let Some(key) = self.load(&name)? {
                keys.insert(name, Arc::new(key));
            }
        }
        Ok(keys)
    }

    fn load(&self, name: &KeyName) -> Result<Option<SoftKey>> {
        let path = self.file(name);
        let wrapped = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io_error("cannot read key file", &path, e)),
        };
        let kek = aes_kw::KekAes256::from(*self.kek);
        let record = Zeroizing::new(kek.unwrap_with_padding_vec(&wrapped).map_err(|_| {
            KeystoreError::Backend(format!(
                "key file {} does not open under the KEK (wrong KEK or corrupt file)",
                path.display()
            ))
        })?);
        decode_record(&record, name).map(Some).ok_or_else(|| {
            KeystoreError::Backend(format!("key file {} is malformed", path.display()))
        })
    }

    /// Writes the key exclusively: a temporary file, fsynced, then hard-linked to its name, so
    /// a reader never sees a partial file and two writers cannot both win.
    fn store(&self, name: &KeyName, key: &SoftKey) -> Result<()> {
        use std::io::Write;
        let record = encode_record(key);
        let kek = aes_kw::KekAes256::from(*self.kek);
        let wrapped = kek
            .wrap_with_padding_vec(&record)
            .map_err(|e| KeystoreError::Backend(format!("cannot wrap key record: {e}")))?;
        let suffix = hex::encode(*secret::random::<8>().map_err(rng_error)?);
        let tmp = self.path.join(format!(".tmp-{name}-{suffix}"));
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
            let target = self.file(name);
            match std::fs::hard_link(&tmp, &target) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                    return Err(KeystoreError::KeyExists)
                }
                Err(e) => return Err(io_error("cannot commit key file", &target, e)),
            }
            sync_dir(&self.path);
            Ok(())
        })();
        let _ = std::fs::remove_file(&tmp);
        result
    }

    /// Removes the key's file; `false` if there was none.
    fn remove(&self, name: &KeyName) -> Result<bool> {
        let path = self.file(name);
        match std::fs::remove_file(&path) {
            Ok(()) => {
                sync_dir(&self.path);
                Ok(true)
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(io_error("cannot delete key file", &path, e)),
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
        },
        master: Zeroizing::new(*master),
        hmac: (has_hmac == 1).then(|| Zeroizing::new(*hmac)),
    })
}
