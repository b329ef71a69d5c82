//! How kesh lays keys out on a token: labels, metadata, and the templates that make master
//! keys non-extractable.
//!
//! A key `<name>` is one master-key object and (usually) one HMAC-key object, both labelled
//! `<prefix><name>`. `CKA_ID` holds a small JSON record, [`Meta`]: role, state, a creation nonce
//! linking the pair, scheme, algorithm and provenance. A key is visible only once its master
//! object's state is `ready` (the commit point of a create, see `create` in the parent module).
//!
//! Key versions (rotation): version N ≥ 2 is one more master object under the same label,
//! with `version` and `base` (the nonce of version 1's master) in its record; version 1's
//! record has neither. New versions have no HMAC object: `/v1/key/hmac` keeps version 1's.
//!
//! Template invariants (docs/FORMAT.md §6, docs/SECURITY.md): master keys are token, private, sensitive and never
//! extractable; no derive, sign, verify, wrap or unwrap unless the scheme needs it; and
//! `CKA_ALLOWED_MECHANISMS` is exactly the scheme's mechanism.

use cryptoki::mechanism::{Mechanism, MechanismType};
use cryptoki::object::{Attribute, KeyType, ObjectClass};
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use crate::crypto::kes::Algorithm;
use crate::keystore::{KeyInfo, Provenance, Scheme};
use crate::name::KeyName;

/// The `kesh` field of the records this version writes and reads.
pub const META_VERSION: u8 = 1;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
/// Which of a key's two objects a record belongs to.
pub enum Role {
    /// The master key.
    Key,
    /// The HMAC key.
    Hmac,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
/// Where an object is in the create protocol.
pub enum State {
    /// Written, not yet committed: invisible to readers.
    Pending,
    /// Committed.
    Ready,
}

/// The record in `CKA_ID`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Meta {
    /// The record format version ([`META_VERSION`]).
    pub kesh: u8,
    /// Master or HMAC object.
    pub role: Role,
    /// Pending or ready.
    pub state: State,
    /// Links a master key to its HMAC key, and orders concurrent creators.
    pub nonce: String,
    /// Unix seconds when the object was written; pending objects older than
    /// [`STALE_PENDING_SECS`] belong to a crashed creator.
    pub ts: i64,
    /// The key's scheme (`gcm`, `kwp`, `kes`).
    pub scheme: String,
    /// The key's algorithm (`AES256`).
    pub alg: String,
    #[serde(with = "time::serde::rfc3339")]
    /// When the key was made.
    pub created_at: OffsetDateTime,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    /// Who made it; empty when unknown.
    pub created_by: String,
    /// The key version this master object is; absent = 1. For versions ≥ 2, `created_at` and
    /// `created_by` are the version's.
    #[serde(default = "first_version", skip_serializing_if = "is_first_version")]
    pub version: u32,
    /// For versions ≥ 2: the `nonce` of the key's version-1 master, so a version left by an
    /// interrupted delete is never taken for a version of a new key of the same name.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub base: String,
}

fn first_version() -> u32 {
    1
}

fn is_first_version(v: &u32) -> bool {
    *v == 1
}

/// Pending objects older than this are leftovers of a crashed create and may be removed.
pub const STALE_PENDING_SECS: i64 = 10;

impl Meta {
    /// A pending record for a new object.
    pub fn new(
        role: Role,
        nonce: &str,
        scheme: Scheme,
        alg: Algorithm,
        provenance: &Provenance,
    ) -> Self {
        Meta {
            kesh: META_VERSION,
            role,
            state: State::Pending,
            nonce: nonce.to_owned(),
            ts: OffsetDateTime::now_utc().unix_timestamp(),
            scheme: scheme.as_str().to_owned(),
            alg: alg.as_str().to_owned(),
            created_at: provenance.created_at,
            created_by: provenance.created_by.clone(),
            version: 1,
            base: String::new(),
        }
    }

    /// The record of version `version` (≥ 2) of the key whose version-1 nonce is `base`.
    pub fn of_version(mut self, version: u32, base: &str) -> Self {
        self.version = version;
        self.base = base.to_owned();
        self
    }

    /// The JSON bytes stored in `CKA_ID`.
    pub fn encode(&self) -> Vec<u8> {
        // Serialising a struct of strings and integers cannot fail.
        serde_json::to_vec(self).expect("Meta serialises")
    }

    /// Parses `CKA_ID` bytes; `None` for anything but a record of this version.
    pub fn decode(bytes: &[u8]) -> Option<Self> {
        serde_json::from_slice::<Meta>(bytes)
            .ok()
            .filter(|m| m.kesh == META_VERSION)
    }

    /// The same record, committed.
    pub fn ready(mut self) -> Self {
        self.state = State::Ready;
        self
    }

    /// Whether this is a pending object of a creator that crashed (older than [`STALE_PENDING_SECS`]).
    pub fn is_stale_pending(&self, now: i64) -> bool {
        self.state == State::Pending && now - self.ts > STALE_PENDING_SECS
    }

    /// What `describe` reports, from a master key's record; `None` if it names an unknown scheme or algorithm.
    pub fn key_info(&self, name: &KeyName) -> Option<KeyInfo> {
        Some(KeyInfo {
            name: name.clone(),
            scheme: Scheme::parse(&self.scheme)?,
            algorithm: Algorithm::from_import_name(&self.alg)?,
            created_at: self.created_at,
            created_by: self.created_by.clone(),
            version: 1,
        })
    }
}

/// The mechanism a scheme's master key may be used with, and nothing else.
pub fn scheme_mechanism(scheme: Scheme) -> MechanismType {
    match scheme {
        Scheme::Gcm => MechanismType::AES_GCM,
        Scheme::Kwp => MechanismType::AES_KEY_WRAP_PAD,
        Scheme::Kes => MechanismType::SHA256_HMAC,
    }
}

/// What every master key is, token object or not: private, sensitive, never extractable, no
/// derive.
fn protected(token: bool) -> Vec<Attribute> {
    vec![
        Attribute::Class(ObjectClass::SECRET_KEY),
        Attribute::Token(token),
        Attribute::Private(true),
        Attribute::Sensitive(true),
        Attribute::Extractable(false),
        Attribute::Derive(false),
    ]
}

fn common(label: &str, meta: &Meta) -> Vec<Attribute> {
    let mut t = protected(true);
    t.push(Attribute::Label(label.as_bytes().to_vec()));
    t.push(Attribute::Id(meta.encode()));
    t
}

/// The key type, usage flags and allowed mechanism of a scheme's master key.
fn scheme_attributes(scheme: Scheme) -> [Attribute; 8] {
    let kwp = scheme == Scheme::Kwp;
    let gcm = scheme == Scheme::Gcm;
    let kes = scheme == Scheme::Kes;
    [
        Attribute::KeyType(if kes {
            KeyType::GENERIC_SECRET
        } else {
            KeyType::AES
        }),
        Attribute::Encrypt(gcm),
        Attribute::Decrypt(gcm),
        Attribute::Wrap(kwp),
        Attribute::Unwrap(kwp),
        // The `kes` scheme derives per-message keys with HMAC: sign only, never verify.
        Attribute::Sign(kes),
        Attribute::Verify(false),
        Attribute::AllowedMechanisms(vec![scheme_mechanism(scheme)]),
    ]
}

/// The mechanism that generates a scheme's master key on the device.
pub fn keygen_mechanism(scheme: Scheme) -> Mechanism<'static> {
    match scheme {
        Scheme::Gcm | Scheme::Kwp => Mechanism::AesKeyGen,
        Scheme::Kes => Mechanism::GenericSecretKeyGen,
    }
}

/// The master key's template. `value` is `Some` for imported material (C_CreateObject) and
/// `None` for a key the device generates (C_GenerateKey).
pub fn master_template(
    label: &str,
    meta: &Meta,
    scheme: Scheme,
    value: Option<Vec<u8>>,
) -> Vec<Attribute> {
    let mut t = common(label, meta);
    t.extend(scheme_attributes(scheme));
    match value {
        Some(v) => t.push(Attribute::Value(v)),
        None => t.push(Attribute::ValueLen(32.into())),
    }
    t
}

/// A session object with every attribute of a master key of `scheme` but its label and
/// metadata: what `kesh hsm probe` tests a device with, so the probe's verdict is the
/// keystore's.
pub fn probe_template(scheme: Scheme) -> Vec<Attribute> {
    let mut t = protected(false);
    t.extend(scheme_attributes(scheme));
    t.push(Attribute::ValueLen(32.into()));
    t
}

/// The HMAC key's template: a generic secret for `CKM_SHA256_HMAC` sign/verify only.
pub fn hmac_template(label: &str, meta: &Meta, value: Option<Vec<u8>>) -> Vec<Attribute> {
    let mut t = common(label, meta);
    t.extend([
        Attribute::KeyType(KeyType::GENERIC_SECRET),
        Attribute::Encrypt(false),
        Attribute::Decrypt(false),
        Attribute::Wrap(false),
        Attribute::Unwrap(false),
        Attribute::Sign(true),
        Attribute::Verify(true),
        Attribute::AllowedMechanisms(vec![MechanismType::SHA256_HMAC]),
    ]);
    match value {
        Some(v) => t.push(Attribute::Value(v)),
        None => t.push(Attribute::ValueLen(32.into())),
    }
    t
}

/// A session object carrying bytes to wrap (`kwp` seal): readable by design, gone with the
/// session, destroyed right after use.
pub fn transient_template(value: Vec<u8>) -> Vec<Attribute> {
    let mut t = transient_unwrap_template();
    t.push(Attribute::Value(value));
    t
}

/// The template for bytes unwrapped by the `kwp` scheme, read back and destroyed at once.
pub fn transient_unwrap_template() -> Vec<Attribute> {
    vec![
        Attribute::Class(ObjectClass::SECRET_KEY),
        Attribute::KeyType(KeyType::GENERIC_SECRET),
        Attribute::Token(false),
        Attribute::Private(true),
        Attribute::Sensitive(false),
        Attribute::Extractable(true),
    ]
}

/// Overwrites key bytes inside a template after the call that consumed it.
pub fn wipe(template: &mut [Attribute]) {
    use zeroize::Zeroize;
    for a in template {
        if let Attribute::Value(v) = a {
            v.zeroize();
        }
    }
}
