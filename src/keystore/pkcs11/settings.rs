//! The pkcs11 keystore's settings: as the config file gives them ([`Pkcs11Config`], what
//! was left out is `None`), and as they apply once the profile is known ([`Settings`]: the
//! config's values, else the profile's).
//!
//! Owns the types and that one resolution; `config::keystore` fills [`Pkcs11Config`] from YAML.

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use super::profile::Profile;
use crate::keystore::Scheme;
use crate::secret::Pin;

/// How the token is found: by label or by serial number, never by slot number.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenSelector {
    /// The token's label (`token:`).
    Label(String),
    /// The token's serial number (`serial:`).
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
    /// kesh draws the IV from the HSM's random bytes and passes it in.
    Caller,
    /// The device draws the IV and writes it back.
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

/// Validated settings of the pkcs11 keystore (`keystore.pkcs11` in the config). The tunables
/// are `None` where the config leaves them to the profile.
#[derive(Debug, Clone)]
pub struct Pkcs11Config {
    /// `module:`, the PKCS#11 library.
    pub module: PathBuf,
    /// `token:` or `serial:`.
    pub token: TokenSelector,
    /// `pin:` or the content of `pin_file:`.
    pub pin: Pin,
    /// Label namespace, so kesh can share a token with other applications.
    pub prefix: String,
    /// How long a request waits for a free session before `Busy` (503 + Retry-After).
    pub session_wait: Duration,
    /// `profile:`; `None` detects it from the module at start.
    pub profile: Option<&'static Profile>,
    /// Session pool size: the most PKCS#11 calls in flight at once.
    pub sessions: Option<usize>,
    /// Scheme of keys made by `create`.
    pub scheme: Option<Scheme>,
    /// `iv:`, who draws GCM IVs.
    pub iv: Option<IvSource>,
    /// Use keys through session-object copies made on the device ([`super::copies`]).
    pub session_keys: Option<bool>,
    /// Seal and unseal `gcm` keys with PKCS#11 3.0 message-based AEAD, one call each, when the
    /// module offers it ([`super::message`]); `None` means yes.
    pub message_aead: Option<bool>,
    /// A file every kesh process on this host takes around token writes
    /// ([`super::writelock`]); `Some(None)` is `write_lock: none`.
    pub write_lock: Option<Option<PathBuf>>,
}

impl Pkcs11Config {
    /// Settings for `token` with everything else left to the profile (`None`: detected).
    pub fn new(
        module: PathBuf,
        token: TokenSelector,
        pin: Pin,
        profile: Option<&'static Profile>,
    ) -> Self {
        Pkcs11Config {
            module,
            token,
            pin,
            prefix: "kesh/".into(),
            session_wait: Duration::from_secs(2),
            profile,
            sessions: None,
            scheme: None,
            iv: None,
            session_keys: None,
            message_aead: None,
            write_lock: None,
        }
    }
}

/// The settings in force: the config's, with the profile's defaults where it has none.
#[derive(Debug, Clone)]
pub struct Settings {
    /// The profile in force, configured or detected.
    pub profile: &'static Profile,
    /// Whether the profile came from `profile:` (else it was detected).
    pub profile_configured: bool,
    /// Session pool size, and worker threads.
    pub sessions: usize,
    /// Scheme of keys made by `create`.
    pub scheme: Scheme,
    /// Who draws GCM IVs.
    pub iv: IvSource,
    /// Whether keys are used through session-object copies.
    pub session_keys: bool,
    /// Whether `gcm` keys use message-based AEAD when the module offers it.
    pub message_aead: bool,
    /// The host write lock file, if any.
    pub write_lock: Option<PathBuf>,
}

impl Settings {
    /// `cfg` over `detected` (used only when `cfg` names no profile).
    pub fn resolve(cfg: &Pkcs11Config, detected: &'static Profile) -> Self {
        let profile = cfg.profile.unwrap_or(detected);
        Settings {
            profile,
            profile_configured: cfg.profile.is_some(),
            sessions: cfg.sessions.unwrap_or(profile.sessions),
            scheme: cfg.scheme.unwrap_or(profile.scheme),
            iv: cfg.iv.unwrap_or(profile.iv),
            session_keys: cfg.session_keys.unwrap_or(profile.session_keys),
            message_aead: cfg.message_aead.unwrap_or(true),
            write_lock: match &cfg.write_lock {
                Some(chosen) => chosen.clone(),
                None => profile.host_write_lock.and_then(|path| path()),
            },
        }
    }
}
