//! Ciphertext formats and the host-side halves of the schemes.
//!
//! Owns every byte layout kesh writes or reads (`docs/FORMAT.md`): the native framing of the
//! `gcm` and `kwp` schemes ([`native`]) and KES's current and legacy formats ([`kes`]). Pure
//! functions only: no I/O, no PKCS#11. The soft keystore calls the `*_soft` helpers; the pkcs11
//! keystore computes the same values on the device and uses only the framing.

pub mod kes;
pub mod kes_key;
pub mod native;
pub mod versioned;

/// A ciphertext failed authentication or was malformed. Deliberately carries no detail: the
/// wire answer is the same for a wrong key, a wrong context, tampering and truncation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("ciphertext is not authentic")]
pub struct NotAuthentic;

/// SHA-256 of a context, the binding the `kwp` scheme wraps with the DEK.
pub fn context_digest(context: &[u8]) -> [u8; 32] {
    use sha2::Digest;
    sha2::Sha256::digest(context).into()
}

/// HMAC-SHA256 in the host, for the soft keystore and the KES key derivation.
pub fn hmac_sha256(key: &[u8], message: &[u8]) -> [u8; 32] {
    use hmac::Mac;
    // HMAC accepts keys of any length, so `new_from_slice` cannot fail.
    let mut mac =
        hmac::Hmac::<sha2::Sha256>::new_from_slice(key).expect("HMAC takes any key length");
    mac.update(message);
    mac.finalize().into_bytes().into()
}
