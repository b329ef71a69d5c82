//! Throwaway SoftHSMv2 tokens for `kesh server --dev` and the test suite.
//!
//! SoftHSM reads `SOFTHSM2_CONF` once, at `C_Initialize`, so every ephemeral token of a
//! process lives in one directory: the one `SOFTHSM2_CONF` already names, or a fresh one this
//! module creates (and sets) before the module is first initialized. Tokens are initialized
//! through the module itself (`C_InitToken`, `C_InitPIN`), which works whether or not the
//! process has initialized it already.

use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};

use cryptoki::context::Pkcs11;
use cryptoki::session::UserType;
use cryptoki::types::AuthPin;

use super::super::{device, profile, Pkcs11Config, TokenSelector};
use crate::locks::IgnorePoison;
use crate::secret::Pin;

/// The SoftHSM module, if installed (`KESH_SOFTHSM_MODULE` overrides the search).
pub fn module_path() -> Option<PathBuf> {
    if let Ok(p) = std::env::var("KESH_SOFTHSM_MODULE") {
        return Some(PathBuf::from(p)).filter(|p| p.exists());
    }
    profile::SOFTHSM
        .module_paths
        .iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
}

/// Errors making a token; they say what to install or fix.
#[derive(Debug, thiserror::Error)]
#[error("SoftHSM: {0}")]
pub struct SoftHsmError(String);

static PRIVATE_DIR: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Makes this process keep its ephemeral tokens in a directory of its own even when
/// `SOFTHSM2_CONF` names the user's real one (`kesh server --dev` must not leave tokens there).
/// Call before the first token is made.
pub fn use_private_token_dir() {
    PRIVATE_DIR.store(true, std::sync::atomic::Ordering::Relaxed);
}

/// The directory the process's ephemeral tokens live in, and whether this module made it.
fn token_home() -> Result<&'static (PathBuf, bool), SoftHsmError> {
    static HOME: OnceLock<Result<(PathBuf, bool), String>> = OnceLock::new();
    HOME.get_or_init(|| {
        let private = PRIVATE_DIR.load(std::sync::atomic::Ordering::Relaxed);
        if let Some(conf) = std::env::var_os("SOFTHSM2_CONF").filter(|_| !private) {
            return Ok((PathBuf::from(conf).parent().map(Path::to_owned).unwrap_or_default(), false));
        }
        let dir = std::env::temp_dir().join(format!("kesh-softhsm-{}", std::process::id()));
        let tokens = dir.join("tokens");
        std::fs::create_dir_all(&tokens).map_err(|e| format!("cannot create {}: {e}", tokens.display()))?;
        let conf = dir.join("softhsm2.conf");
        std::fs::write(&conf, format!("directories.tokendir = {}\nobjectstore.backend = file\nlog.level = ERROR\nslots.removable = false\n", tokens.display()))
            .map_err(|e| format!("cannot write {}: {e}", conf.display()))?;
        // Set before any C_Initialize in this process; nothing else reads the environment
        // concurrently this early (tokens are made at start-up or by tests under a lock).
        std::env::set_var("SOFTHSM2_CONF", &conf);
        Ok((dir, true))
    })
    .as_ref()
    .map_err(|e| SoftHsmError(e.clone()))
}

/// A freshly initialized SoftHSM token with a random label and PIN.
#[derive(Debug)]
pub struct EphemeralToken {
    /// The PKCS#11 module that serves the token.
    pub module: PathBuf,
    /// The token's label.
    pub label: String,
    pin: Pin,
}

impl EphemeralToken {
    /// Initializes a new token. Fails with an install hint when SoftHSM is missing.
    pub fn create() -> Result<Self, SoftHsmError> {
        static LOCK: Mutex<()> = Mutex::new(());
        // One initializer at a time: SoftHSM hands out "the" free slot.
        let _guard = LOCK.lock().ignore_poison();
        let module = module_path().ok_or_else(|| {
            SoftHsmError(
                "libsofthsm2.so not found; install it with `apt-get install softhsm2`".into(),
            )
        })?;
        token_home()?;
        let suffix =
            hex::encode(*crate::secret::random::<6>().map_err(|e| SoftHsmError(e.to_string()))?);
        let label = format!("kesh-{suffix}");
        let pin = Pin::new(hex::encode(
            *crate::secret::random::<8>().map_err(|e| SoftHsmError(e.to_string()))?,
        ));
        let ck = |what: &str| {
            let what = what.to_owned();
            move |e: cryptoki::error::Error| SoftHsmError(format!("{what}: {e}"))
        };
        let ctx = Pkcs11::new(&module).map_err(ck("loading the module"))?;
        device::initialize(&ctx).map_err(|e| SoftHsmError(e.to_string()))?;
        let slot = ctx
            .get_all_slots()
            .map_err(ck("C_GetSlotList"))?
            .into_iter()
            .find(|s| {
                ctx.get_token_info(*s)
                    .map(|t| !t.token_initialized())
                    .unwrap_or(false)
            })
            .ok_or_else(|| SoftHsmError("no free slot to initialize a token in".into()))?;
        let so_pin = AuthPin::new(pin.expose().into());
        ctx.init_token(slot, &so_pin, &label)
            .map_err(ck("C_InitToken"))?;
        // C_InitToken moves the token to a new slot id in SoftHSM: find it again by label.
        let slot = device::find_slot(&ctx, &TokenSelector::Label(label.clone()))
            .map_err(|e| SoftHsmError(e.to_string()))?;
        let session = ctx.open_rw_session(slot).map_err(ck("C_OpenSession"))?;
        session
            .login(UserType::So, Some(&so_pin))
            .map_err(ck("C_Login(SO)"))?;
        session
            .init_pin(&AuthPin::new(pin.expose().into()))
            .map_err(ck("C_InitPIN"))?;
        let _ = session.logout();
        Ok(EphemeralToken { module, label, pin })
    }

    /// A token someone else initialized (the test script's), used the same way.
    pub fn existing(label: String, pin: Pin) -> Result<Self, SoftHsmError> {
        let module = module_path().ok_or_else(|| {
            SoftHsmError(
                "libsofthsm2.so not found; install it with `apt-get install softhsm2`".into(),
            )
        })?;
        Ok(EphemeralToken { module, label, pin })
    }

    /// A token someone else initialized on another module (the suite's Kryoptic tokens).
    /// `config` still gives SoftHSM's profile defaults: the caller adjusts them.
    pub fn existing_on(module: PathBuf, label: String, pin: Pin) -> Self {
        EphemeralToken { module, label, pin }
    }

    /// The token's PIN, for tests that open a second handle on the token.
    pub fn pin(&self) -> &Pin {
        &self.pin
    }

    /// A keystore configuration for this token with SoftHSM's profile defaults.
    pub fn config(&self) -> Pkcs11Config {
        Pkcs11Config::new(
            self.module.clone(),
            TokenSelector::Label(self.label.clone()),
            self.pin.clone(),
            Some(&profile::SOFTHSM),
        )
    }
}

/// Removes the token directory this process created, if it created one. Call at exit.
pub fn cleanup() {
    if let Ok((dir, true)) = token_home() {
        let _ = std::fs::remove_dir_all(dir);
    }
}
