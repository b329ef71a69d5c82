//! The pkcs11 backend's one error type, [`Pkcs11Error`], and the one reading of PKCS#11
//! return codes ([`meaning`]).
//!
//! Device-level codes mean the sessions or the login are gone: the caller starts recovery
//! (re-initialize, log in, rebuild the index). Everything else is about one request. The
//! keystore boundary turns a [`Pkcs11Error`] into a [`KeystoreError`] in one place (its
//! `From`), wrapping it whole. Never holds secrets: a failed call is its function and code.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use cryptoki::context::Function;
use cryptoki::error::{Error as CkError, RvError};

use super::profile::{GoneObjects, TagFailures};
use crate::keystore::{KeystoreError, Scheme};
use crate::name::KeyName;

/// What a return code means for kesh.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Meaning {
    /// The device, the module's state, the sessions or the login are gone: recover.
    Device,
    /// The object handle is stale (deleted elsewhere, or from before a recovery).
    StaleHandle,
    /// A GCM tag or KWP integrity check failed.
    NotAuthentic,
    /// The module has no session left to open.
    NoSession,
    /// A plain per-request error.
    Request,
}

/// The one mapping from PKCS#11 return codes to what they mean for kesh.
pub fn meaning(rv: RvError) -> Meaning {
    match rv {
        RvError::DeviceError
        | RvError::DeviceRemoved
        | RvError::DeviceMemory
        | RvError::TokenNotPresent
        | RvError::TokenNotRecognized
        | RvError::SessionHandleInvalid
        | RvError::SessionClosed
        | RvError::CryptokiNotInitialized
        | RvError::UserNotLoggedIn
        | RvError::SlotIdInvalid => Meaning::Device,
        RvError::ObjectHandleInvalid | RvError::KeyHandleInvalid => Meaning::StaleHandle,
        RvError::EncryptedDataInvalid
        | RvError::EncryptedDataLenRange
        | RvError::WrappedKeyInvalid
        | RvError::WrappedKeyLenRange => Meaning::NotAuthentic,
        RvError::SessionCount => Meaning::NoSession,
        _ => Meaning::Request,
    }
}

/// After a refused PIN, when kesh logs in next; the message tells the operator.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NextLogin {
    /// Not decided here (`kesh hsm probe`).
    Unsaid,
    /// Never: the start fails.
    Never,
    /// Once, when the operator reloads.
    OnReload,
}

/// Every failure inside the pkcs11 backend.
#[allow(
    missing_docs,
    reason = "each variant's #[error] message says what it and its fields are"
)]
#[derive(Debug, Clone, thiserror::Error)]
pub enum Pkcs11Error {
    /// A PKCS#11 function returned an error code.
    #[error("{function} returned {rv:?}")]
    Call { function: Function, rv: RvError },
    /// cryptoki failed without a return code (converting an argument, a missing symbol).
    #[error("{0}")]
    Cryptoki(Arc<CkError>),
    /// The module could not be loaded.
    #[error("cannot load PKCS#11 module {}: {source}", path.display())]
    Load { path: PathBuf, source: Arc<CkError> },
    /// `C_Login` refused the PIN. Never retried by kesh on its own: HSMs count failed logins
    /// per partition and lock it (for every application on it) past a limit.
    #[error("C_Login: the token refused the PIN ({rv}){}", next_login_hint(*next))]
    PinRefused { rv: RvError, next: NextLogin },
    /// No slot holds the configured token.
    #[error(
        "no initialized token with {token}; tokens present: {}",
        present_list(present)
    )]
    TokenNotFound {
        token: String,
        /// One line a token seen instead (or a slot that could not be read).
        present: Vec<String>,
    },
    /// The device is out of service and no failure was recorded yet.
    #[error("the PKCS#11 device is out of service")]
    OutOfService,
    /// The process is exiting: no call is started on a module whose destructors may run.
    #[error("the process is exiting")]
    Exiting,
    /// The device is out of service while kesh reconnects.
    #[error("recovering from: {0}")]
    Recovering(Box<Pkcs11Error>),
    /// A handle from another device generation, or of an object gone: search again.
    #[error("stale object handle")]
    Stale,
    #[error("key already exists")]
    KeyExists,
    #[error("key does not exist")]
    KeyNotFound,
    #[error("key version does not exist")]
    VersionNotFound,
    #[error("ciphertext is not authentic")]
    NotAuthentic,
    #[error("key does not support HMAC")]
    HmacUnsupported,
    /// The token lacks the mechanism of the scheme a key needs.
    #[error("{}", scheme_not_offered(*.0))]
    SchemeNotOffered(Scheme),
    /// The configured `scheme:` is one the token lacks: no create could succeed.
    #[error(
        "`scheme: {0}`: algorithm '{what}' is not supported by this keystore; `kesh hsm probe` \
         shows the schemes it supports",
        what = scheme_not_offered(*.0)
    )]
    ConfiguredSchemeNotOffered(Scheme),
    /// The device refused a call kesh's create protocol is built on (see
    /// [`Pkcs11Error::refuses_layout`]).
    #[error(
        "this HSM cannot hold keys in kesh's layout: {function} returned {rv:?} during a \
         create; this module is unsupported for creating or importing keys with this \
         scheme (see the README's HSM table and `kesh hsm probe`)"
    )]
    LayoutRefused { function: Function, rv: RvError },
    #[error("another instance keeps creating '{0}' at the same time; try again")]
    CreateContended(KeyName),
    #[error("another instance keeps rotating '{0}' at the same time; try again")]
    RotateContended(KeyName),
    /// With `iv: device`, a device that used the zeroed IV it was handed instead of its own.
    #[error(
        "the HSM wrote no GCM IV back (iv: device); this device uses the IV it is given: set \
         `iv: caller` (see `kesh hsm probe`)"
    )]
    NoIvReturned,
    #[error("CKM_SHA256_HMAC returned {0} bytes")]
    MacLength(usize),
    /// A seal was handed fewer random bytes than its scheme takes (a bug in kesh).
    #[error("{0} random bytes are too few for this seal")]
    ShortRandom(usize),
    #[error("cannot open the token write lock {} (`write_lock:`): {source}", path.display())]
    WriteLockOpen {
        path: PathBuf,
        source: Arc<std::io::Error>,
    },
    #[error("cannot lock the token write lock {}: {source}", path.display())]
    WriteLockFailed {
        path: PathBuf,
        source: Arc<std::io::Error>,
    },
    #[error("another process held the token write lock {} for over {limit:?}", path.display())]
    WriteLockBusy { path: PathBuf, limit: Duration },
    #[error("cannot start the PKCS#11 worker threads: {0}")]
    Workers(Arc<std::io::Error>),
    /// No worker took the call within `session_wait`.
    #[error("no session free within {0:?}")]
    Busy(Duration),
    #[error("a PKCS#11 worker failed during the call")]
    WorkerLost,
    #[error("PKCS#11 worker failed: {0}")]
    Join(Arc<tokio::task::JoinError>),
}

fn next_login_hint(next: NextLogin) -> &'static str {
    match next {
        NextLogin::Unsaid => "",
        NextLogin::Never => {
            ": check `pin:` or `pin_file:`; kesh tried once and will not try again (HSMs lock \
             a partition after repeated bad PINs)"
        }
        NextLogin::OnReload => {
            ": kesh will not log in again on its own; fix `pin:`/`pin_file:`, then reload \
             (SIGHUP, `systemctl reload kesh`) for one new attempt"
        }
    }
}

fn present_list(present: &[String]) -> String {
    if present.is_empty() {
        "none".to_owned()
    } else {
        present.join(", ")
    }
}

fn scheme_not_offered(scheme: Scheme) -> &'static str {
    match scheme {
        Scheme::Gcm => "gcm (CKM_AES_GCM, which this token does not offer)",
        Scheme::Kwp => "kwp (CKM_AES_KEY_WRAP_PAD, which this token does not offer)",
        Scheme::Kes => "kes (CKM_SHA256_HMAC, which this token does not offer)",
    }
}

impl From<CkError> for Pkcs11Error {
    fn from(e: CkError) -> Self {
        match e {
            CkError::Pkcs11(rv, function) => Pkcs11Error::Call { function, rv },
            other => Pkcs11Error::Cryptoki(Arc::new(other)),
        }
    }
}

impl From<crate::crypto::NotAuthentic> for Pkcs11Error {
    fn from(_: crate::crypto::NotAuthentic) -> Self {
        Pkcs11Error::NotAuthentic
    }
}

impl Pkcs11Error {
    /// What a failed call's code means; `None` for failures that are not a call's code.
    pub fn meaning(&self) -> Option<Meaning> {
        match self {
            Pkcs11Error::Call { rv, .. } => Some(meaning(*rv)),
            Pkcs11Error::Cryptoki(e) if matches!(**e, CkError::LibraryLoading(_)) => {
                Some(Meaning::Device)
            }
            Pkcs11Error::Cryptoki(_) => Some(Meaning::Request),
            _ => None,
        }
    }

    /// Whether the device must be reconnected.
    pub fn needs_recovery(&self) -> bool {
        self.meaning() == Some(Meaning::Device)
    }

    /// Whether the handles used are stale: search the token again.
    pub fn is_stale(&self) -> bool {
        matches!(self, Pkcs11Error::Stale) || self.meaning() == Some(Meaning::StaleHandle)
    }

    /// Whether the device refused one of the calls kesh's create protocol is built on.
    ///
    /// Some modules cannot hold keys the way kesh lays them out (`objects`): one has no
    /// `C_SetAttributeValue`, which the create's commit needs (pending → ready in `CKA_ID`);
    /// another refuses `CKK_GENERIC_SECRET` HMAC keys and `CKA_ALLOWED_MECHANISMS` (the
    /// profiles in [`super::profile`] and hsm-config/profiles/ say which). Without this, such
    /// a create fails with a bare 502 and no log line that says why.
    pub fn refuses_layout(&self) -> Option<Pkcs11Error> {
        let Pkcs11Error::Call { function, rv } = *self else {
            return None;
        };
        matches!(
            rv,
            RvError::FunctionNotSupported
                | RvError::TemplateInconsistent
                | RvError::TemplateIncomplete
                | RvError::AttributeTypeInvalid
                | RvError::AttributeValueInvalid
                | RvError::AttributeReadOnly
                | RvError::MechanismInvalid
                | RvError::KeyTypeInconsistent
        )
        .then_some(Pkcs11Error::LayoutRefused { function, rv })
    }

    /// [`Pkcs11Error`] of an unsealing call, reading a module's own way of saying "not
    /// authentic" as that; on other modules a general error stays a backend failure.
    pub fn unsealing(self, how: TagFailures) -> Pkcs11Error {
        match (&self, how) {
            (
                Pkcs11Error::Call {
                    function: Function::Decrypt | Function::DecryptMessage | Function::UnwrapKey,
                    rv: RvError::GeneralError | RvError::FunctionFailed,
                },
                TagFailures::GeneralError,
            ) => Pkcs11Error::NotAuthentic,
            _ if self.meaning() == Some(Meaning::NotAuthentic) => Pkcs11Error::NotAuthentic,
            _ => self,
        }
    }
}

/// The keystore boundary: what each pkcs11 failure is to a caller of the [`KeyStore`](crate::keystore::KeyStore)
/// (`crate::keystore::KeyStore`) trait.
impl From<Pkcs11Error> for KeystoreError {
    fn from(e: Pkcs11Error) -> Self {
        use Pkcs11Error as P;
        match (e.meaning(), &e) {
            (Some(Meaning::Device), _) => KeystoreError::Unreachable(e.into()),
            (Some(Meaning::StaleHandle), _) | (_, P::Stale) => KeystoreError::KeyNotFound,
            (Some(Meaning::NotAuthentic), _) | (_, P::NotAuthentic) => KeystoreError::NotAuthentic,
            (Some(Meaning::NoSession), _) => KeystoreError::Busy(Duration::ZERO),
            (Some(Meaning::Request), _) => KeystoreError::Backend(e.into()),
            (None, P::KeyExists) => KeystoreError::KeyExists,
            (None, P::VersionNotFound) => KeystoreError::VersionNotFound,
            (None, P::KeyNotFound) => KeystoreError::KeyNotFound,
            (None, P::HmacUnsupported) => KeystoreError::HmacUnsupported,
            (None, P::SchemeNotOffered(scheme)) => {
                KeystoreError::AlgorithmUnsupported(scheme_not_offered(*scheme))
            }
            (None, P::ConfiguredSchemeNotOffered(_)) => KeystoreError::InvalidInput(e.into()),
            (None, P::Busy(wait)) => KeystoreError::Busy(*wait),
            (None, _) if e.keeps_device_away() => KeystoreError::Unreachable(e.into()),
            // The create protocol, the host (write lock, workers) or a device breaking the
            // rules of one call: this request failed, the device serves the next.
            (None, _) => KeystoreError::Backend(e.into()),
        }
    }
}

impl Pkcs11Error {
    /// Whether no request can be served until the device, the module or the login is back.
    fn keeps_device_away(&self) -> bool {
        matches!(
            self,
            Pkcs11Error::Load { .. }
                | Pkcs11Error::PinRefused { .. }
                | Pkcs11Error::TokenNotFound { .. }
                | Pkcs11Error::OutOfService
                | Pkcs11Error::Exiting
                | Pkcs11Error::Recovering(_)
                | Pkcs11Error::WriteLockOpen { .. }
                | Pkcs11Error::Workers(_)
        )
    }
}

impl GoneObjects {
    /// Whether `err`, from a call that used a key handle, may mean the object is gone.
    pub fn maybe_gone(self, err: &Pkcs11Error) -> bool {
        self == GoneObjects::GeneralError
            && matches!(
                err,
                Pkcs11Error::Call {
                    rv: RvError::GeneralError,
                    function: Function::EncryptInit
                        | Function::DecryptInit
                        | Function::MessageEncryptInit
                        | Function::MessageDecryptInit
                        | Function::SignInit
                        | Function::VerifyInit
                        | Function::WrapKey
                        | Function::UnwrapKey
                        | Function::GetAttributeValue
                        | Function::CopyObject,
                }
            )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn call(rv: RvError, function: Function) -> Pkcs11Error {
        CkError::Pkcs11(rv, function).into()
    }

    #[test]
    fn a_general_error_means_not_authentic_only_where_the_module_says_so() {
        let general = || call(RvError::GeneralError, Function::Decrypt);
        assert!(matches!(
            general().unsealing(TagFailures::GeneralError),
            Pkcs11Error::NotAuthentic
        ));
        assert!(matches!(
            KeystoreError::from(general().unsealing(TagFailures::Standard)),
            KeystoreError::Backend(_)
        ));
        let standard = call(RvError::EncryptedDataInvalid, Function::Decrypt);
        assert!(matches!(
            standard.unsealing(TagFailures::Standard),
            Pkcs11Error::NotAuthentic
        ));
    }

    #[test]
    fn a_refused_create_call_is_explained() {
        let e = call(RvError::FunctionNotSupported, Function::SetAttributeValue);
        assert!(e
            .refuses_layout()
            .is_some_and(|m| m.to_string().contains("SetAttributeValue")));
        let e = call(RvError::DeviceError, Function::GenerateKey);
        assert!(e.refuses_layout().is_none());
    }

    #[test]
    fn a_general_error_means_maybe_gone_only_where_the_profile_says_so() {
        let init = call(RvError::GeneralError, Function::DecryptInit);
        assert!(GoneObjects::GeneralError.maybe_gone(&init));
        assert!(!GoneObjects::Standard.maybe_gone(&init));
        // Only calls that look the object up; a failing C_Decrypt is about the data.
        let decrypt = call(RvError::GeneralError, Function::Decrypt);
        assert!(!GoneObjects::GeneralError.maybe_gone(&decrypt));
    }

    #[test]
    fn device_codes_trigger_recovery() {
        for rv in [
            RvError::DeviceError,
            RvError::DeviceRemoved,
            RvError::SessionHandleInvalid,
            RvError::UserNotLoggedIn,
            RvError::TokenNotPresent,
        ] {
            let e = call(rv, Function::Encrypt);
            assert!(e.needs_recovery(), "{rv:?}");
            assert!(
                matches!(KeystoreError::from(e), KeystoreError::Unreachable(_)),
                "{rv:?}"
            );
        }
        let stale = call(RvError::KeyHandleInvalid, Function::EncryptInit);
        assert!(stale.is_stale() && !stale.needs_recovery());
        assert_eq!(KeystoreError::from(stale), KeystoreError::KeyNotFound);
        assert_eq!(
            KeystoreError::from(call(RvError::EncryptedDataInvalid, Function::Decrypt)),
            KeystoreError::NotAuthentic
        );
    }

    #[test]
    fn a_wrapped_failure_keeps_its_function_and_code() {
        let e = KeystoreError::from(call(RvError::GeneralError, Function::Sign));
        let source = std::error::Error::source(&e).map(|s| s.to_string());
        assert_eq!(
            source.as_deref(),
            Some("Function::Sign returned GeneralError")
        );
        assert_eq!(
            e.to_string(),
            "keystore error: Function::Sign returned GeneralError"
        );
    }
}
