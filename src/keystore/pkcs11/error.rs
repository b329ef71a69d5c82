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

/// How a module reports a failed integrity check when unsealing (GCM tag, KWP check); each
/// [`super::Profile`] says which.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TagFailures {
    /// `CKR_ENCRYPTED_DATA_INVALID` / `CKR_WRAPPED_KEY_INVALID`, as the standard says.
    Standard,
    /// `CKR_GENERAL_ERROR` (or `CKR_FUNCTION_FAILED`) from `C_Decrypt`/`C_UnwrapKey`.
    GeneralError,
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

/// How a module reports a handle whose token object another process deleted; each
/// [`super::Profile`] says which.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GoneObjects {
    /// `CKR_OBJECT_HANDLE_INVALID` / `CKR_KEY_HANDLE_INVALID`.
    Standard,
    /// The handle still names the object, whose row in a store shared with other processes
    /// is gone, and the lookup fails as `CKR_GENERAL_ERROR`. Such an error from a call on a
    /// key handle may mean the key is gone: kesh searches the token once more to tell.
    GeneralError,
}

impl GoneObjects {
    /// Whether `err`, from a call that used a key handle, may mean the object is gone.
    pub fn maybe_gone(self, err: &CkError) -> bool {
        self == GoneObjects::GeneralError
            && matches!(
                err,
                CkError::Pkcs11(
                    RvError::GeneralError,
                    Function::EncryptInit
                        | Function::DecryptInit
                        | Function::MessageEncryptInit
                        | Function::MessageDecryptInit
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

/// What to tell the operator when the device refuses one of the calls kesh's create protocol
/// is built on: `None` for any other failure.
///
/// Some modules cannot hold keys the way kesh lays them out (`objects`): one has no
/// `C_SetAttributeValue`, which the create's commit needs (pending → ready in `CKA_ID`);
/// another refuses `CKK_GENERIC_SECRET` HMAC keys and `CKA_ALLOWED_MECHANISMS` (the
/// profiles in [`super::profile`] and hsm-config/profiles/ say which). Without this, such a
/// create fails with a bare 502 and no log line that says why.
pub fn create_refusal(err: &CkError) -> Option<String> {
    let CkError::Pkcs11(rv, function) = err else {
        return None;
    };
    let refused = matches!(
        rv,
        RvError::FunctionNotSupported
            | RvError::TemplateInconsistent
            | RvError::TemplateIncomplete
            | RvError::AttributeTypeInvalid
            | RvError::AttributeValueInvalid
            | RvError::AttributeReadOnly
            | RvError::MechanismInvalid
            | RvError::KeyTypeInconsistent
    );
    refused.then(|| {
        format!(
            "this HSM cannot hold keys in kesh's layout: {function} returned {rv:?} during a \
             create; this module is unsupported for creating or importing keys with this \
             scheme (see the README's HSM table and `kesh hsm probe`)"
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_general_error_means_not_authentic_only_where_the_module_says_so() {
        let general = CkError::Pkcs11(RvError::GeneralError, Function::Decrypt);
        assert_eq!(
            classify_unseal(&general, TagFailures::GeneralError),
            Failure::Request(KeystoreError::NotAuthentic)
        );
        assert!(matches!(
            classify_unseal(&general, TagFailures::Standard),
            Failure::Request(KeystoreError::Backend(_))
        ));
        let standard = CkError::Pkcs11(RvError::EncryptedDataInvalid, Function::Decrypt);
        assert_eq!(
            classify_unseal(&standard, TagFailures::Standard),
            Failure::Request(KeystoreError::NotAuthentic)
        );
    }

    #[test]
    fn a_refused_create_call_is_explained() {
        let e = CkError::Pkcs11(RvError::FunctionNotSupported, Function::SetAttributeValue);
        assert!(create_refusal(&e).is_some_and(|m| m.contains("SetAttributeValue")));
        let e = CkError::Pkcs11(RvError::DeviceError, Function::GenerateKey);
        assert_eq!(create_refusal(&e), None);
    }

    #[test]
    fn a_general_error_means_maybe_gone_only_where_the_profile_says_so() {
        let init = CkError::Pkcs11(RvError::GeneralError, Function::DecryptInit);
        assert!(GoneObjects::GeneralError.maybe_gone(&init));
        assert!(!GoneObjects::Standard.maybe_gone(&init));
        // Only calls that look the object up; a failing C_Decrypt is about the data.
        let decrypt = CkError::Pkcs11(RvError::GeneralError, Function::Decrypt);
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
