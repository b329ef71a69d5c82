//! What a `keystore:` section selects, validated: the backend and its settings.
//!
//! Owns the types `config::keystore` fills from YAML. Data only, like the backends' own
//! settings ([`super::pkcs11::settings`]), so the config layer that imports them never
//! depends on a backend; opening what they name is [`KeystoreConfig::open`], in the parent.

use std::path::PathBuf;

use super::pkcs11::settings::Pkcs11Config;
use super::Scheme;
use crate::secret::Pin;

/// A validated keystore section.
#[derive(Debug, Clone)]
pub enum KeystoreConfig {
    /// An HSM through its PKCS#11 module (`pkcs11:`).
    Pkcs11(Pkcs11Config),
    /// The embedded keystore (`soft:`).
    Soft(SoftConfig),
}

/// The embedded keystore: in memory, or a directory of KEK-wrapped key files.
#[derive(Debug, Clone, Default)]
pub struct SoftConfig {
    /// `dir:`: keep keys as wrapped files there; `None` keeps them in memory.
    pub dir: Option<SoftDir>,
    /// `scheme:` of created keys (default `gcm`).
    pub scheme: Option<Scheme>,
}

/// `soft.dir:`: where the key files live and the file holding their KEK.
#[derive(Debug, Clone)]
pub struct SoftDir {
    /// The key directory.
    pub path: PathBuf,
    /// The file holding the 32-byte KEK (base64 or hex).
    pub kek_file: PathBuf,
}

impl KeystoreConfig {
    /// The PIN the section names (read from `pin_file:` or substituted from the environment
    /// when the file was loaded), for keystores that log in.
    pub fn pin(&self) -> Option<&Pin> {
        match self {
            KeystoreConfig::Pkcs11(c) => Some(&c.pin),
            KeystoreConfig::Soft(_) => None,
        }
    }
}
