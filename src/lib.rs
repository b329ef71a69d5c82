//! kesh: a KES-compatible key-management server whose master keys live in a PKCS#11 HSM.
//!
//! # Architecture map
//!
//! Layers, each a module; imports point down only (`../shared/DESIGN.md` §1):
//!
//! | module       | owns                                                         | never touches          |
//! |--------------|--------------------------------------------------------------|------------------------|
//! | `main.rs`, `cli/` | argument parsing, exit codes, the `kes`-style client commands | PKCS#11           |
//! | [`migrate`]  | `kesh migrate`: a KES `fs` key directory or KES's Vault K/V → any [`keystore`] | the server, key material on disk |
//! | [`server`]   | rustls mTLS, routes, the one error→HTTP mapping, limits; inside it [`server::service`] (one method per API operation: authorize → keystore → metrics), [`server::policy`], [`server::audit`] with its [`server::logsink`], [`server::metrics`], [`server::hardening`] | cryptoki, ciphertext bytes |
//! | [`identity`] | a client's identity: the SHA-256 of the certificate's public key (server and CLI) | policy |
//! | [`tls`]      | the rustls crypto provider and PEM loading, for both sides    | what a peer must present |
//! | [`api`]      | wire DTOs shared by server and [`client`]                    | logic                  |
//! | [`client`]   | a small KES client (hyper + rustls) for the CLI and tests, and [`client::bench`] (`kesh bench`) | the server internals |
//! | [`config`]   | raw YAML → validated settings, `${VAR}` substitution         | I/O beyond reading files |
//! | [`keystore`] | `trait KeyStore`, backends [`keystore::pkcs11`] (with `kesh hsm probe` in [`keystore::pkcs11::probe`]) and [`keystore::soft`] | HTTP, policy |
//! | [`crypto`]   | ciphertext formats (native, KES, legacy), KES stored keys, host-side AEAD | I/O of any kind |
//! | [`name`]     | validated key names and list patterns                        | everything else        |
//! | [`secret`]   | secret-holding types that zeroize and never print            | everything else        |
//!
//! # One request's walk (generate a data key)
//!
//! The rustls acceptor completes mTLS and hashes the client's SPKI into an
//! [`identity::Identity`] once per connection. [`server`] matches the route, applies the body
//! limit and deadline, and asks [`service::Service`] to authorize the decoded path against the
//! [`policy::Authorizer`] (deny first; admin bypasses), yielding a [`policy::Permit`]. The service
//! hands a validated [`name::KeyName`] and the context bytes to
//! [`keystore::KeyStore::generate`]. The pkcs11 backend takes a session permit, leaves the async
//! runtime through `spawn_blocking`, draws the DEK and IV from the HSM's RNG and seals the DEK
//! with `CKM_AES_GCM` under the named master key, the context as AAD; [`crypto::native`] frames
//! the result. The plaintext DEK travels back in a zeroizing buffer; the dispatcher counts the
//! request in [`metrics`] and writes its [`audit`] event (never key material).

pub mod api;
pub mod client;
pub mod config;
pub mod crypto;
pub mod identity;
pub mod keystore;
pub mod locks;
pub mod migrate;
pub mod name;
pub mod secret;
pub mod server;
pub mod tls;
