//! Configuration: the KES-style YAML file, raw → validated.
//!
//! Owns reading the file, `${VAR}` substitution ([`env`]) and turning raw sections into
//! validated settings. The `keystore:` section lives in [`keystore`]; the rest of the file
//! (address, admin, tls, policy, cache, api, log, keys) in [`server`]. Errors name the field
//! and say how to fix it.

pub mod env;
pub mod keystore;
pub mod server;

/// A configuration error: which field, and what to do.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("config: {field}: {message}")]
pub struct ConfigError {
    pub field: String,
    pub message: String,
}

impl ConfigError {
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        ConfigError { field: field.into(), message: message.into() }
    }
}
