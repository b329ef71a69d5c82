//! The one mapping from PKCS#11 return codes to [`KeystoreError`].
//!
//! Device-level codes mean the sessions or the login are gone: the caller starts recovery
//! (re-initialize, log in, rebuild the index). Everything else is about one request.

use cryptoki::context::Function;
use cryptoki::error::{Error as CkError, RvError};

use crate::keystore::KeystoreError;

/// What a failed call means for kesh.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Failure {
    /// The device, the module's state, the sessions or the login are gone: recover.
    Device(String),
    /// The object handle is stale (deleted elsewhere, or from before a recovery).
    StaleHandle,
    /// A plain per-request error.
    Request(KeystoreError),
}

/// Classifies a cryptoki error. Never includes secrets: only the function and the code.
pub fn classify(err: &CkError) -> Failure {
    match err {
        CkError::Pkcs11(rv, function) => {
            let what = format!("{function} returned {rv:?}");
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
                | RvError::SlotIdInvalid => Failure::Device(what),
                RvError::ObjectHandleInvalid | RvError::KeyHandleInvalid => Failure::StaleHandle,
                // A GCM tag or KWP integrity check failed.
                RvError::EncryptedDataInvalid
                | RvError::EncryptedDataLenRange
                | RvError::WrappedKeyInvalid
                | RvError::WrappedKeyLenRange => Failure::Request(KeystoreError::NotAuthentic),
                RvError::SessionCount => {
                    Failure::Request(KeystoreError::Busy(std::time::Duration::ZERO))
                }
                _ => Failure::Request(KeystoreError::Backend(what)),
            }
        }
        CkError::LibraryLoading(e) => {
            Failure::Device(format!("cannot load the PKCS#11 module: {e}"))
        }
        other => Failure::Request(KeystoreError::Backend(other.to_string())),
    }
}

/// How a module reports a failed integrity check when unsealing (GCM tag, KWP check).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TagFailures {
    /// `CKR_ENCRYPTED_DATA_INVALID` / `CKR_WRAPPED_KEY_INVALID`, as the standard says.
    Standard,
    /// SoftHSM: `CKR_GENERAL_ERROR` (or `CKR_FUNCTION_FAILED`) from `C_Decrypt`/`C_UnwrapKey`.
    GeneralError,
}

impl TagFailures {
    /// The quirk of the module whose library manufacturer is `manufacturer`.
    pub fn of(manufacturer: &str) -> Self {
        if manufacturer.trim().eq_ignore_ascii_case("SoftHSM") {
            TagFailures::GeneralError
        } else {
            TagFailures::Standard
        }
    }
}

/// [`classify`] for the unsealing calls, reading a module's own way of saying "not authentic"
/// as that; on other modules a general error stays a backend failure.
pub fn classify_unseal(err: &CkError, how: TagFailures) -> Failure {
    match (how, err) {
        (
            TagFailures::GeneralError,
            CkError::Pkcs11(
                RvError::GeneralError | RvError::FunctionFailed,
                Function::Decrypt | Function::UnwrapKey,
            ),
        ) => Failure::Request(KeystoreError::NotAuthentic),
        _ => classify(err),
    }
}

/// How a module reports a handle whose token object another process deleted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GoneObjects {
    /// `CKR_OBJECT_HANDLE_INVALID` / `CKR_KEY_HANDLE_INVALID`.
    Standard,
    /// Kryoptic: its handle still names the object, whose row in the shared sqlite store is
    /// gone, and the lookup fails as `CKR_GENERAL_ERROR`. Such an error from a call on a key
    /// handle may mean the key is gone: kesh searches the token once more to tell.
    GeneralError,
}

impl GoneObjects {
    /// The quirk of the module whose library manufacturer is `manufacturer`.
    pub fn of(manufacturer: &str) -> Self {
        if manufacturer.trim().eq_ignore_ascii_case("Kryoptic") {
            GoneObjects::GeneralError
        } else {
            GoneObjects::Standard
        }
    }

    /// Whether `err`, from a call that used a key handle, may mean the object is gone.
    pub fn maybe_gone(self, err: &CkError) -> bool {
        self == GoneObjects::GeneralError
            && matches!(
                err,
                CkError::Pkcs11(
                    RvError::GeneralError,
                    Function::EncryptInit
                        | Function::DecryptInit
                        | Function::SignInit
                        | Function::VerifyInit
                        | Function::WrapKey
                        | Function::UnwrapKey
                        | Function::GetAttributeValue
                        | Function::CopyObject,
                )
            )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_general_error_means_not_authentic_only_where_the_module_says_so() {
        let general = CkError::Pkcs11(RvError::GeneralError, Function::Decrypt);
        assert_eq!(
            classify_unseal(&general, TagFailures::of("SoftHSM")),
            Failure::Request(KeystoreError::NotAuthentic)
        );
        assert!(matches!(
            classify_unseal(&general, TagFailures::of("SafeNet, Inc.")),
            Failure::Request(KeystoreError::Backend(_))
        ));
        let standard = CkError::Pkcs11(RvError::EncryptedDataInvalid, Function::Decrypt);
        assert_eq!(
            classify_unseal(&standard, TagFailures::Standard),
            Failure::Request(KeystoreError::NotAuthentic)
        );
    }

    #[test]
    fn a_general_error_means_maybe_gone_only_on_kryoptic() {
        let init = CkError::Pkcs11(RvError::GeneralError, Function::DecryptInit);
        assert!(GoneObjects::of("Kryoptic").maybe_gone(&init));
        assert!(!GoneObjects::of("SoftHSM").maybe_gone(&init));
        // Only calls that look the object up; a failing C_Decrypt is about the data.
        let decrypt = CkError::Pkcs11(RvError::GeneralError, Function::Decrypt);
        assert!(!GoneObjects::of("Kryoptic").maybe_gone(&decrypt));
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
            assert!(
                matches!(
                    classify(&CkError::Pkcs11(rv, Function::Encrypt)),
                    Failure::Device(_)
                ),
                "{rv:?}"
            );
        }
        assert_eq!(
            classify(&CkError::Pkcs11(
                RvError::KeyHandleInvalid,
                Function::EncryptInit
            )),
            Failure::StaleHandle
        );
        assert_eq!(
            classify(&CkError::Pkcs11(
                RvError::EncryptedDataInvalid,
                Function::Decrypt
            )),
            Failure::Request(KeystoreError::NotAuthentic)
        );
    }
}
