//! kesh: a KES-compatible key-management server whose master keys live in a PKCS#11 HSM.
//!
//! # Architecture map
//!
//! docs/ARCHITECTURE.md is the full guide (a request's walk, the PKCS#11 seam, error flow,
//! where to add a route, a keystore, a vendor quirk, a metric or a config field); docs/api.md
//! is the HTTP API. Layers, each a module; imports point down only:
//!
//! | module       | owns                                                         | never touches          |
//! |--------------|--------------------------------------------------------------|------------------------|
//! | `main.rs`, `cli/` | argument parsing, exit codes, the `kes`-style client commands (binary only) | PKCS#11 directly |
//! | [`migrate`]  | `kesh migrate`: a KES `fs` key directory or KES's Vault K/V → any [`keystore`] | the server, key material on disk |
//! | [`server`]   | rustls mTLS, dispatch, routes, the one error→HTTP mapping ([`server::error`]), limits; [`server::service`] (one method per API operation: keystore call, metrics), [`server::policy`] (the only authorization point), [`server::audit`] with [`server::logsink`], [`server::metrics`], [`server::hardening`] | cryptoki, ciphertext bytes |
//! | [`identity`] | a client's identity: the SHA-256 of the certificate's public key (server and CLI) | policy |
//! | [`tls`]      | the rustls crypto provider and PEM loading, for both sides    | what a peer must present |
//! | [`api`]      | wire DTOs shared by server and [`client`]                    | logic                  |
//! | [`client`]   | a small KES client (hyper + rustls) for the CLI and tests, and [`client::bench`] (`kesh bench`) | the server internals |
//! | [`config`]   | config file → validated settings, `${VAR}` substitution; reads the config, PIN and KEK files | HTTP, policy decisions, opening a keystore ([`keystore::settings::KeystoreConfig::open`] does) |
//! | [`keystore`] | `trait KeyStore`, backends [`keystore::pkcs11`] (every cryptoki call, inline for a fast device or on its worker threads) and [`keystore::soft`] | HTTP, policy |
//! | [`crypto`]   | ciphertext formats (native, KES, legacy), KES stored keys, host-side AEAD | I/O of any kind |
//! | [`name`]     | validated key names and list patterns                        | everything else        |
//! | [`secret`]   | secret-holding types that zeroize and never print            | everything else        |
//!
//! # One request's walk (generate a data key)
//!
//! The rustls acceptor completes mTLS and hashes the client's SPKI into an
//! [`identity::Identity`] once per connection. [`server`] matches the route, applies the
//! deadline, and authorizes the decoded path through [`server::service::Service::authorize`]
//! against the [`server::policy::Authorizer`] (admin passes; otherwise deny patterns first, then
//! allow), yielding a [`server::policy::Permit`]. It reads the body within the route's limit and
//! hands a validated [`name::KeyName`] and the context to [`keystore::KeyStore::generate`]. The
//! pkcs11 backend runs the device calls inline while the device is fast (a local token), else
//! queues them for one of its worker threads ([`keystore::pkcs11::workers`]; `Busy` when none
//! takes them within `session_wait`); the call draws the DEK and IV from the HSM's random bytes and seals the DEK on the device with
//! `CKM_AES_GCM` under the named master key, the context as AAD; [`crypto::native`] frames the
//! result. The plaintext DEK travels back in a zeroizing buffer; the dispatcher counts the
//! request in [`server::metrics`] and writes its [`server::audit`] event (never key material).

#![warn(missing_docs)]

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
