//! kesh: a KES-compatible key-management server whose master keys live in a PKCS#11 HSM.
//!
//! # Architecture map
//!
//! Layers, each a module; imports point down only (`../shared/DESIGN.md` §1):
//!
//! | module       | owns                                                         | never touches          |
//! |--------------|--------------------------------------------------------------|------------------------|
//! | `main.rs`    | argument parsing, exit codes                                 | PKCS#11                |
//! | [`config`]   | raw YAML → validated settings, `${VAR}` substitution         | I/O beyond reading files |
//! | [`keystore`] | `trait KeyStore`, backends [`keystore::pkcs11`] and [`keystore::soft`] | HTTP, policy |
//! | [`crypto`]   | ciphertext formats (native, KES, legacy) and host-side AEAD  | I/O of any kind        |
//! | [`name`]     | validated key names and list patterns                        | everything else        |
//! | [`secret`]   | secret-holding types that zeroize and never print            | everything else        |
//!
//! # One request's walk (generate a data key)
//!
//! The server (mTLS, routing, policy) hands a validated [`name::KeyName`] and the context bytes to
//! [`keystore::KeyStore::generate`]. The pkcs11 backend takes a session permit, leaves the async
//! runtime through `spawn_blocking`, draws the DEK and IV from the HSM's RNG and seals the DEK
//! with `CKM_AES_GCM` under the named master key, the context as AAD; [`crypto::native`] frames
//! the result. The plaintext DEK travels back in a zeroizing buffer.

pub mod config;
pub mod crypto;
pub mod keystore;
pub mod name;
pub mod secret;
