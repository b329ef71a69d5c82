//! One live connection to a token: the initialized module, the slot, the login and a pool of
//! sessions.
//!
//! Owns every cryptoki call that is not about a key: initialize, find the token, log in, open
//! and recycle sessions. A `Device` is replaced wholesale on recovery; its sessions and the
//! object handles found through it die with it.

use std::sync::Mutex;

use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::error::{Error as CkError, RvError};
use cryptoki::session::{Session, UserType};
use cryptoki::slot::Slot;
use cryptoki::types::AuthPin;

use super::copies::SessionCopies;
use super::error::{NextLogin, Pkcs11Error};
use super::message::MessageCalls;
use super::objects::scheme_mechanism;
use super::profile::{self, GoneObjects, Profile, TagFailures};
use super::raw::RawCalls;
use super::{Pkcs11Config, Settings, TokenSelector};
use crate::keystore::Scheme;
use crate::locks::IgnorePoison;
use crate::secret::Pin;

/// One connection to the token: its slot, login and the pool of open sessions.
pub struct Device {
    /// The slot the token was found in (by label or serial, never by number).
    pub slot: Slot,
    /// Counts reconnections: handles from another generation are refused before use.
    pub generation: u64,
    /// Sessions not in use. At most `sessions` exist at once: one per worker thread.
    idle: Mutex<Vec<Session>>,
    /// Session-object copies of keys made through this device's sessions (`session_keys`).
    pub copies: SessionCopies,
    /// How this module reports a failed GCM tag or KWP check.
    pub tag_failures: TagFailures,
    /// How this module reports a key another process deleted.
    pub gone_objects: GoneObjects,
    /// Schemes whose mechanism the token says it does not have. A key of such a scheme is
    /// refused when made, where every use of it would fail with a backend error.
    lacking: Vec<Scheme>,
    /// The module's own C_Encrypt/C_Decrypt, for one-call seals (`raw`).
    pub raw: Option<RawCalls>,
    /// PKCS#11 3.0 message-based AES-GCM, for one-call `gcm` seals and unseals, when the
    /// module offers it (and kesh supplies the IVs).
    pub message: Option<MessageCalls>,
    /// Held open for the device's lifetime: PKCS#11 logs the application out when its last
    /// session closes. Declared last: the pooled sessions close before it.
    _login: Mutex<Session>,
}

/// One `C_Login` as the user. The codes that mean "this PIN is wrong" (or can no longer be
/// used) come back as [`Pkcs11Error::PinRefused`]; a session already logged in is fine.
pub fn login(session: &Session, pin: &Pin) -> Result<(), Pkcs11Error> {
    let pin = AuthPin::new(pin.expose().into());
    match session.login(UserType::User, Some(&pin)) {
        Ok(()) | Err(CkError::Pkcs11(RvError::UserAlreadyLoggedIn, _)) => Ok(()),
        Err(CkError::Pkcs11(
            rv @ (RvError::PinIncorrect
            | RvError::PinInvalid
            | RvError::PinLenRange
            | RvError::PinExpired
            | RvError::PinLocked),
            _,
        )) => Err(Pkcs11Error::PinRefused {
            rv,
            next: NextLogin::Unsaid,
        }),
        Err(e) => Err(e.into()),
    }
}

/// Initializes the module for multi-threaded use; "already initialized" is fine.
pub fn initialize(ctx: &Pkcs11) -> Result<(), Pkcs11Error> {
    match ctx.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK)) {
        Ok(()) | Err(CkError::Pkcs11(RvError::CryptokiAlreadyInitialized, _)) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// Finds the configured token among the slots that hold one.
pub fn find_slot(ctx: &Pkcs11, token: &TokenSelector) -> Result<Slot, Pkcs11Error> {
    find_slot_with(ctx, token, false)
}

/// [`find_slot`]; with `reinitialize`, an unreadable token list also re-initializes the
/// module between attempts (profiles with `reinit_on_unreadable_slots`). Some software tokens
/// read each token's file once, at `C_Initialize`: a token
/// another process was rewriting at that moment stays unreadable (CKR_GENERAL_ERROR, or a
/// blank label), or is left out of the slot list altogether, until the module is initialized
/// again. Only for a caller that owns the module in its process (connecting a keystore), since
/// it ends every other session.
fn find_slot_with(
    ctx: &Pkcs11,
    token: &TokenSelector,
    reinitialize: bool,
) -> Result<Slot, Pkcs11Error> {
    let mut attempt = 0;
    loop {
        match find_slot_once(ctx, token) {
            // A missing token is looked for again after a re-initialization, a few times: it
            // may have been skipped while unreadable; a wrong label still fails in ~1 s.
            Err((e, unreadable))
                if (unreadable && attempt < 25) || (reinitialize && attempt < 4) =>
            {
                attempt += 1;
                tracing::debug!(error = %e, "token not found or list incomplete; retrying");
                if reinitialize && (!unreadable || attempt % 3 == 0) {
                    let _ = ctx.clone().finalize();
                    initialize(ctx)?;
                }
                std::thread::sleep(std::time::Duration::from_millis(
                    (20u64 << attempt.min(4)).min(250),
                ));
            }
            other => return other.map_err(|(e, _)| e),
        }
    }
}

/// One pass over the slots; the flag says whether some token could not be read.
fn find_slot_once(ctx: &Pkcs11, token: &TokenSelector) -> Result<Slot, (Pkcs11Error, bool)> {
    // Not `get_slots_with_initialized_token`: it fails as a whole when any one token cannot
    // be read (e.g. one another process is writing to), where ours may be fine.
    let slots = ctx.get_slots_with_token().map_err(|e| (e.into(), true))?;
    let mut seen = Vec::new();
    let mut unreadable = false;
    for slot in slots {
        let info = match ctx.get_token_info(slot) {
            Ok(info) if !info.token_initialized() => continue,
            Ok(info) => info,
            Err(e) => {
                unreadable = true;
                seen.push(format!("slot {slot}: C_GetTokenInfo failed: {e}"));
                continue;
            }
        };
        let (label, serial) = (
            info.label().trim_end().to_owned(),
            info.serial_number().trim_end().to_owned(),
        );
        if label.is_empty() && serial.is_empty() {
            // A token file read while another process rewrote it: look again.
            unreadable = true;
            continue;
        }
        let hit = match token {
            TokenSelector::Label(l) => &label == l,
            TokenSelector::Serial(s) => &serial == s,
        };
        if hit {
            return Ok(slot);
        }
        seen.push(format!("'{label}' (serial {serial})"));
    }
    Err((
        Pkcs11Error::TokenNotFound {
            token: token.to_string(),
            present: seen,
        },
        unreadable,
    ))
}

/// The profile of the module `ctx` has loaded (initialized) for the token `token`, from the
/// library's manufacturer ID and, where the token can be found, its own.
pub fn detect_profile(ctx: &Pkcs11, token: &TokenSelector) -> &'static Profile {
    let library = ctx
        .get_library_info()
        .map(|i| i.manufacturer_id().to_owned())
        .unwrap_or_default();
    let token = find_slot_once(ctx, token)
        .ok()
        .and_then(|slot| ctx.get_token_info(slot).ok())
        .map(|i| i.manufacturer_id().to_owned());
    profile::detect(&library, token.as_deref())
}

/// The schemes whose mechanism `C_GetMechanismInfo` calls invalid on `slot`. Only that code
/// counts: a module that cannot answer (or a passing fault) leaves a scheme to be tried.
fn lacking(ctx: &Pkcs11, slot: Slot) -> Vec<Scheme> {
    [Scheme::Gcm, Scheme::Kwp, Scheme::Kes]
        .into_iter()
        .filter(|s| {
            matches!(
                ctx.get_mechanism_info(slot, scheme_mechanism(*s)),
                Err(CkError::Pkcs11(RvError::MechanismInvalid, _))
            )
        })
        .collect()
}

impl Device {
    /// Refuses a scheme the token lacks: a key of it could be made but never used.
    pub fn offers(&self, scheme: Scheme) -> Result<(), Pkcs11Error> {
        if self.lacking.contains(&scheme) {
            return Err(Pkcs11Error::SchemeNotOffered(scheme));
        }
        Ok(())
    }

    /// Opens the login session and logs in as the user with `pin`: exactly one `C_Login`.
    pub fn connect(
        ctx: &Pkcs11,
        cfg: &Pkcs11Config,
        settings: &Settings,
        pin: &Pin,
        generation: u64,
    ) -> Result<Self, Pkcs11Error> {
        initialize(ctx)?;
        let reinitialize = settings.profile.reinit_on_unreadable_slots;
        let slot = find_slot_with(ctx, &cfg.token, reinitialize)?;
        let session = ctx.open_rw_session(slot)?;
        login(&session, pin)?;
        Ok(Device {
            slot,
            generation,
            idle: Mutex::new(Vec::new()),
            copies: SessionCopies::new(settings.session_keys),
            tag_failures: settings.profile.tag_failures,
            gone_objects: settings.profile.gone_objects,
            lacking: lacking(ctx, slot),
            raw: RawCalls::of_loaded(&cfg.module),
            message: match settings.iv {
                super::IvSource::Caller if settings.message_aead => {
                    MessageCalls::of_loaded(&cfg.module, ctx, slot)
                }
                _ => None,
            },
            _login: Mutex::new(session),
        })
    }

    /// A session for one operation: an idle one, or a new one.
    pub fn checkout(&self, ctx: &Pkcs11) -> Result<Session, CkError> {
        // A poisoned lock only means a panic while pushing or popping a Vec: it is intact.
        let idle = self.idle.lock().ignore_poison().pop();
        match idle {
            Some(s) => Ok(s),
            None => ctx.open_rw_session(self.slot),
        }
    }

    /// Returns a session after a call that left it in a known state.
    pub fn checkin(&self, session: Session) {
        self.idle.lock().ignore_poison().push(session);
    }
}
