//! One method per KES API operation: authorize → keystore → metrics.
//!
//! The service sits between the HTTP layer and the [`KeyStore`]. It knows identities, policies
//! and keys, but no HTTP types: it takes validated names and a [`Permit`], and fails with a
//! [`ServiceError`] that the server turns into a status and message in one place
//! (`server::error`). The audit event for each request is written by the server's dispatcher,
//! which alone knows the final status code.

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use time::OffsetDateTime;

use crate::crypto::kes::Algorithm;
use crate::identity::Identity;
use crate::keystore::{
    DataKey, HmacKeySource, ImportKey, KeyInfo, KeyStore, KeystoreError, Provenance, Scheme,
};
use crate::locks::IgnorePoison;
use crate::name::{KeyName, Pattern};
use crate::secret::{Key32, SecretBytes};
use crate::server::metrics::Metrics;
use crate::server::policy::{Authorizer, Denial, Permit, Policy, PolicyName};

/// The keystore call a request makes: names its latency and error metrics, and chooses the
/// wire message of a backend failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyOp {
    /// `/v1/key/create`.
    Create,
    /// `/v1/key/import`.
    Import,
    /// `/v1/key/describe`.
    Describe,
    /// `/v1/key/list`.
    List,
    /// `/v1/key/delete`.
    Delete,
    /// `/v1/key/generate`.
    Generate,
    /// `/v1/key/encrypt`.
    Encrypt,
    /// `/v1/key/decrypt`.
    Decrypt,
    /// `/v1/key/hmac`.
    Hmac,
    /// [`KeyStore::status`], the probe behind `/v1/ready` and `/v1/status`.
    Status,
    /// [`KeyStore::rotate`] (kesh's extension).
    Rotate,
    /// [`KeyStore::versions`] (kesh's extension).
    Versions,
    /// [`KeyStore::destroy_version`] (kesh's extension).
    DestroyVersion,
}

impl KeyOp {
    /// The operation as metric labels and logs name it.
    pub fn as_str(self) -> &'static str {
        match self {
            KeyOp::Create => "create",
            KeyOp::Import => "import",
            KeyOp::Describe => "describe",
            KeyOp::List => "list",
            KeyOp::Delete => "delete",
            KeyOp::Generate => "generate",
            KeyOp::Encrypt => "encrypt",
            KeyOp::Decrypt => "decrypt",
            KeyOp::Hmac => "hmac",
            KeyOp::Status => "status",
            KeyOp::Rotate => "rotate",
            KeyOp::Versions => "versions",
            KeyOp::DestroyVersion => "destroy_version",
        }
    }
}

impl std::fmt::Display for KeyOp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Errors of the service layer: its own refusals, and the keystore's errors wrapped whole with
/// the operation they happened in (which chooses the wire message of a backend failure).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ServiceError {
    /// No policy allows the path.
    #[error("not authorized")]
    NotAllowed,
    /// A verify route without a client certificate.
    #[error("no client certificate")]
    NoCertificate,
    /// Import with a cipher name that is unknown or that the keystore cannot hold.
    #[error("algorithm '{0}' is not supported")]
    AlgorithmUnsupported(String),
    /// Import of a key of the wrong length for its cipher.
    #[error("invalid key size for '{0}'")]
    InvalidKeySize(String),
    /// No policy by that name.
    #[error("policy does not exist")]
    PolicyNotFound,
    /// No identity by that name.
    #[error("identity does not exist")]
    IdentityNotFound,
    /// The keystore failed `op`; the wire answer depends on both.
    #[error("{op}: {source}")]
    Keystore {
        /// The operation that failed.
        op: KeyOp,
        /// What the keystore said.
        #[source]
        source: KeystoreError,
    },
}

impl ServiceError {
    /// The keystore's error, if this is one.
    pub fn keystore(&self) -> Option<&KeystoreError> {
        match self {
            ServiceError::Keystore { source, .. } => Some(source),
            _ => None,
        }
    }
}

/// A policy as describe/read report it.
#[derive(Debug, Clone)]
pub struct PolicyView {
    /// The policy's name.
    pub name: PolicyName,
    /// Its allow and deny rules.
    pub policy: Policy,
    /// When it was loaded (the server's start or last reload).
    pub created_at: OffsetDateTime,
    /// The admin identity, which configured it.
    pub created_by: Identity,
}

/// An identity as describe reports it.
#[derive(Debug, Clone)]
pub struct IdentityView {
    /// Whether this is the admin identity.
    pub admin: bool,
    /// The policy it is assigned to, if any.
    pub policy: Option<PolicyName>,
    /// When the assignment was loaded.
    pub created_at: OffsetDateTime,
    /// The admin, for identities assigned to a policy.
    pub created_by: Option<Identity>,
}

/// What the caller learns about itself.
#[derive(Debug, Clone)]
pub struct SelfView {
    /// The caller's identity (none without a certificate).
    pub identity: Option<Identity>,
    /// Whether the caller is the admin.
    pub admin: bool,
    /// The caller's policy, if any.
    pub policy: Option<(PolicyName, Policy)>,
    /// When the caller's policy was loaded.
    pub created_at: OffsetDateTime,
    /// The admin, for identities assigned to a policy.
    pub created_by: Option<Identity>,
}

/// Keystore health as `/v1/status` reports it.
#[derive(Debug, Clone, Copy)]
pub enum KeystoreHealth {
    /// Serving; the probe took this long.
    Reachable(Duration),
    /// The probe failed.
    Unreachable,
}

/// The API operations over one keystore and the current authorization snapshot.
pub struct Service {
    keystore: Arc<dyn KeyStore>,
    authorizer: RwLock<Arc<Authorizer>>,
    metrics: Arc<Metrics>,
    started: Instant,
    /// `keys[].rotate_after`, replaced on reload ([`crate::server::rotation`]).
    rotation_schedule: RwLock<Arc<BTreeMap<KeyName, Duration>>>,
}

impl std::fmt::Debug for Service {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Service")
            .field("keystore", &self.keystore.description())
            .finish_non_exhaustive()
    }
}

impl Service {
    /// A service over `keystore`, deciding with `authorizer` and counting in `metrics`.
    pub fn new(keystore: Arc<dyn KeyStore>, authorizer: Authorizer, metrics: Arc<Metrics>) -> Self {
        Service {
            keystore,
            authorizer: RwLock::new(Arc::new(authorizer)),
            metrics,
            started: Instant::now(),
            rotation_schedule: RwLock::new(Arc::new(BTreeMap::new())),
        }
    }

    /// The keys rotated on a schedule, with their periods.
    pub fn rotation_schedule(&self) -> Arc<BTreeMap<KeyName, Duration>> {
        self.rotation_schedule.read().ignore_poison().clone()
    }

    /// Replaces the keys scheduled for rotation (start and reload).
    pub fn set_rotation_schedule(&self, schedule: BTreeMap<KeyName, Duration>) {
        *self.rotation_schedule.write().ignore_poison() = Arc::new(schedule);
    }

    /// The authorization snapshot in force. The lock only guards the pointer swap; a poisoned
    /// lock still holds a complete snapshot.
    pub fn authorizer(&self) -> Arc<Authorizer> {
        self.authorizer.read().ignore_poison().clone()
    }

    /// Installs a new admin and policy set (SIGHUP). Requests in flight keep the old one.
    pub fn replace_authorizer(&self, authorizer: Authorizer) {
        *self.authorizer.write().ignore_poison() = Arc::new(authorizer);
    }

    /// The metrics the service counts in.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// What the keystore reports beside its answers.
    pub fn keystore_stats(&self) -> crate::keystore::KeystoreStats {
        self.keystore.stats()
    }

    /// Hands a reloaded PIN to the keystore (see [`KeyStore::reload_pin`]).
    pub async fn reload_pin(&self, pin: crate::secret::Pin) -> Result<(), KeystoreError> {
        self.keystore.reload_pin(pin).await
    }

    /// One line naming the keystore.
    pub fn keystore_description(&self) -> String {
        self.keystore.description()
    }

    /// Time since the service started.
    pub fn uptime(&self) -> Duration {
        self.started.elapsed()
    }

    /// The check every authenticated route runs; denials are counted.
    pub fn authorize(
        &self,
        identity: Option<&Identity>,
        path: &str,
    ) -> Result<Permit, ServiceError> {
        self.authorizer().authorize(identity, path).map_err(|d| {
            self.metrics.denied();
            match d {
                Denial::NoCertificate => ServiceError::NoCertificate,
                Denial::NotAllowed => ServiceError::NotAllowed,
            }
        })
    }

    /// Identification without authorization (self-describe, `skip_auth` routes).
    pub fn identify_only(&self, identity: Option<&Identity>) -> Permit {
        self.authorizer().identify_only(identity)
    }

    /// Runs one keystore call, timing it and counting its failures.
    async fn call<T>(
        &self,
        op: KeyOp,
        fut: impl std::future::Future<Output = Result<T, KeystoreError>>,
    ) -> Result<T, ServiceError> {
        let start = Instant::now();
        let res = fut.await;
        let kind = res.as_ref().err().map(KeystoreError::kind);
        self.metrics
            .keystore_call(op.as_str(), start.elapsed(), kind);
        res.map_err(|source| ServiceError::Keystore { op, source })
    }

    fn provenance(permit: &Permit) -> Provenance {
        Provenance::now(
            permit
                .identity()
                .map(|i| i.as_str().to_owned())
                .unwrap_or_default(),
        )
    }

    /// `/v1/key/create/<name>`.
    pub async fn create_key(&self, permit: &Permit, name: &KeyName) -> Result<(), ServiceError> {
        self.call(
            KeyOp::Create,
            self.keystore.create(name, Self::provenance(permit)),
        )
        .await
    }

    /// Imports outside key material. The cipher is checked before the length, as in KES.
    /// Imported keys use the `kes` scheme so KES ciphertexts made with them keep decrypting.
    pub async fn import_key(
        &self,
        permit: &Permit,
        name: &KeyName,
        key: &[u8],
        cipher: &str,
    ) -> Result<(), ServiceError> {
        let algorithm = Algorithm::from_import_name(cipher)
            .ok_or_else(|| ServiceError::AlgorithmUnsupported(cipher.to_owned()))?;
        if key.len() != 32 {
            return Err(ServiceError::InvalidKeySize(cipher.to_owned()));
        }
        let mut bytes = Key32::new([0u8; 32]);
        bytes.copy_from_slice(key);
        let import = ImportKey {
            key: bytes,
            algorithm,
            scheme: Scheme::Kes,
            hmac: HmacKeySource::Generate,
            provenance: Self::provenance(permit),
        };
        match self
            .call(KeyOp::Import, self.keystore.import(name, import))
            .await
        {
            // KES names the cipher the client sent.
            Err(ServiceError::Keystore {
                source: KeystoreError::AlgorithmUnsupported(_),
                ..
            }) => Err(ServiceError::AlgorithmUnsupported(cipher.to_owned())),
            other => other,
        }
    }

    /// `/v1/key/describe/<name>`.
    pub async fn describe_key(
        &self,
        _permit: &Permit,
        name: &KeyName,
    ) -> Result<KeyInfo, ServiceError> {
        self.call(KeyOp::Describe, self.keystore.describe(name))
            .await
    }

    /// Every key whose name starts with the pattern's prefix (`abc*` and `abc` alike; `*` and
    /// the empty pattern list everything), sorted.
    pub async fn list_keys(
        &self,
        _permit: &Permit,
        pattern: &Pattern,
    ) -> Result<Vec<KeyName>, ServiceError> {
        self.call(KeyOp::List, self.keystore.list(pattern.prefix()))
            .await
    }

    /// `/v1/key/delete/<name>`.
    pub async fn delete_key(&self, _permit: &Permit, name: &KeyName) -> Result<(), ServiceError> {
        self.call(KeyOp::Delete, self.keystore.delete(name)).await
    }

    /// `/v1/key/generate/<name>`: a fresh data key, plaintext and sealed.
    pub async fn generate_key(
        &self,
        _permit: &Permit,
        name: &KeyName,
        context: &[u8],
    ) -> Result<DataKey, ServiceError> {
        let dek = self
            .call(KeyOp::Generate, self.keystore.generate(name, context))
            .await?;
        self.metrics.sealed(name.as_str());
        Ok(dek)
    }

    /// `/v1/key/encrypt/<name>`.
    pub async fn encrypt(
        &self,
        _permit: &Permit,
        name: &KeyName,
        plaintext: &[u8],
        context: &[u8],
    ) -> Result<Vec<u8>, ServiceError> {
        let ct = self
            .call(
                KeyOp::Encrypt,
                self.keystore.encrypt(name, plaintext, context),
            )
            .await?;
        self.metrics.sealed(name.as_str());
        Ok(ct)
    }

    /// `/v1/key/decrypt/<name>`.
    pub async fn decrypt(
        &self,
        _permit: &Permit,
        name: &KeyName,
        ciphertext: &[u8],
        context: &[u8],
    ) -> Result<SecretBytes, ServiceError> {
        match self
            .call(
                KeyOp::Decrypt,
                self.keystore.decrypt(name, ciphertext, context),
            )
            .await
        {
            // A ciphertext the keystore cannot even parse is just not authentic.
            Err(ServiceError::Keystore {
                op,
                source: KeystoreError::InvalidInput(_),
            }) => Err(ServiceError::Keystore {
                op,
                source: KeystoreError::NotAuthentic,
            }),
            other => other,
        }
    }

    /// `/v1/key/hmac/<name>`.
    pub async fn hmac(
        &self,
        _permit: &Permit,
        name: &KeyName,
        message: &[u8],
    ) -> Result<[u8; 32], ServiceError> {
        self.call(KeyOp::Hmac, self.keystore.hmac(name, message))
            .await
    }

    /// kesh's extension: a new key version that seals from now on; returns its number.
    pub async fn rotate_key(&self, permit: &Permit, name: &KeyName) -> Result<u32, ServiceError> {
        self.call(
            KeyOp::Rotate,
            self.keystore.rotate(name, Self::provenance(permit)),
        )
        .await
    }

    /// kesh's extension: the key's versions with their use since start.
    pub async fn key_versions(
        &self,
        _permit: &Permit,
        name: &KeyName,
    ) -> Result<Vec<crate::keystore::VersionInfo>, ServiceError> {
        self.call(KeyOp::Versions, self.keystore.versions(name))
            .await
    }

    /// kesh's extension: destroys an old key version (refused for the sealing one).
    pub async fn destroy_key_version(
        &self,
        _permit: &Permit,
        name: &KeyName,
        version: u32,
    ) -> Result<(), ServiceError> {
        self.call(
            KeyOp::DestroyVersion,
            self.keystore.destroy_version(name, version),
        )
        .await
    }

    /// Seals and unseals per key version since start, for `/v1/metrics/kesh`.
    pub fn version_usage(&self) -> Vec<crate::keystore::usage::VersionUsage> {
        self.keystore.version_usage()
    }

    /// The scheduler's call: rotates `name` if its newest version is older than `period`.
    pub async fn rotate_if_due(
        &self,
        name: &KeyName,
        period: Duration,
    ) -> Result<crate::keystore::ScheduledRotation, ServiceError> {
        let start = Instant::now();
        let res = self
            .keystore
            .rotate_if_due(name, period, Provenance::now("kesh:rotate_after"))
            .await;
        // Checks that find nothing due are not keystore calls worth a metric.
        if res != Ok(crate::keystore::ScheduledRotation::NotDue) {
            let kind = res.as_ref().err().map(KeystoreError::kind);
            self.metrics
                .keystore_call(KeyOp::Rotate.as_str(), start.elapsed(), kind);
        }
        res.map_err(|source| ServiceError::Keystore {
            op: KeyOp::Rotate,
            source,
        })
    }

    /// `/v1/ready`: the keystore's probe, with its error.
    pub async fn ready(&self, _permit: &Permit) -> Result<Duration, ServiceError> {
        self.call(KeyOp::Status, self.keystore.status()).await
    }

    /// `/v1/status`: any keystore error means unreachable.
    pub async fn keystore_health(&self, permit: &Permit) -> KeystoreHealth {
        match self.ready(permit).await {
            Ok(d) => KeystoreHealth::Reachable(d),
            Err(_) => KeystoreHealth::Unreachable,
        }
    }

    /// `/v1/policy/describe` and `/v1/policy/read`.
    pub fn describe_policy(
        &self,
        _permit: &Permit,
        name: &PolicyName,
    ) -> Result<PolicyView, ServiceError> {
        let auth = self.authorizer();
        let entry = auth.policy(name).ok_or(ServiceError::PolicyNotFound)?;
        Ok(PolicyView {
            name: name.clone(),
            policy: entry.policy.clone(),
            created_at: auth.created_at(),
            created_by: auth.admin().clone(),
        })
    }

    /// Policy names with the pattern's prefix, sorted.
    pub fn list_policies(&self, _permit: &Permit, pattern: &Pattern) -> Vec<PolicyName> {
        let prefix = pattern.prefix();
        self.authorizer()
            .policy_names()
            .filter(|n| n.as_str().starts_with(prefix))
            .cloned()
            .collect()
    }

    /// `/v1/identity/describe/<identity>`.
    pub fn describe_identity(
        &self,
        _permit: &Permit,
        identity: &Identity,
    ) -> Result<IdentityView, ServiceError> {
        let auth = self.authorizer();
        if identity == auth.admin() {
            return Ok(IdentityView {
                admin: true,
                policy: None,
                created_at: auth.created_at(),
                created_by: None,
            });
        }
        let (policy, _) = auth
            .policy_of(identity)
            .ok_or(ServiceError::IdentityNotFound)?;
        Ok(IdentityView {
            admin: false,
            policy: Some(policy.clone()),
            created_at: auth.created_at(),
            created_by: Some(auth.admin().clone()),
        })
    }

    /// Identities with the pattern's prefix, the admin included, sorted.
    pub fn list_identities(&self, _permit: &Permit, pattern: &Pattern) -> Vec<Identity> {
        let prefix = pattern.prefix();
        let mut ids: Vec<Identity> = self
            .authorizer()
            .identities()
            .filter(|i| i.as_str().starts_with(prefix))
            .cloned()
            .collect();
        ids.sort();
        ids.dedup();
        ids
    }

    /// The caller's own identity and policy (for any caller; a deliberate deviation, README.md
    /// "Deviations from KES").
    pub fn describe_self(&self, permit: &Permit) -> Result<SelfView, ServiceError> {
        let auth = self.authorizer();
        let identity = permit.identity().ok_or(ServiceError::IdentityNotFound)?;
        if permit.is_admin() {
            return Ok(SelfView {
                identity: Some(identity.clone()),
                admin: true,
                policy: None,
                created_at: auth.created_at(),
                created_by: None,
            });
        }
        let (name, entry) = auth
            .policy_of(identity)
            .ok_or(ServiceError::IdentityNotFound)?;
        Ok(SelfView {
            identity: Some(identity.clone()),
            admin: false,
            policy: Some((name.clone(), entry.policy.clone())),
            created_at: auth.created_at(),
            created_by: Some(auth.admin().clone()),
        })
    }
}
