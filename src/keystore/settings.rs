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
    Pkcs11(Pkcs11Config),
    Soft(SoftConfig),
}

/// The embedded keystore: in memory, or a directory of KEK-wrapped key files.
#[derive(Debug, Clone, Default)]
pub struct SoftConfig {
    pub dir: Option<SoftDir>,
    pub scheme: Option<Scheme>,
}

#[derive(Debug, Clone)]
pub struct SoftDir {
    pub path: PathBuf,
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
