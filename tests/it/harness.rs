//! Builds the two keystores the suites run against, and small helpers.
//!
//! SoftHSM is required: a missing module fails the test with an install hint, never a skip.

#![allow(dead_code)]

use std::sync::Arc;

use kesh::keystore::pkcs11::softhsm::EphemeralToken;
use kesh::keystore::pkcs11::Pkcs11KeyStore;
use kesh::keystore::soft::SoftKeyStore;
use kesh::keystore::{KeyStore, Provenance};
use kesh::name::KeyName;

/// A keystore under test; keeps its token alive.
pub struct Store {
    pub ks: Arc<dyn KeyStore>,
    pub pkcs11: Option<(Pkcs11KeyStore, Arc<EphemeralToken>)>,
}

impl std::ops::Deref for Store {
    type Target = dyn KeyStore;
    fn deref(&self) -> &Self::Target {
        &*self.ks
    }
}

pub fn soft() -> Store {
    Store { ks: Arc::new(SoftKeyStore::in_memory()), pkcs11: None }
}

pub fn token() -> EphemeralToken {
    EphemeralToken::create().unwrap_or_else(|e| panic!("SoftHSM is required for this test: {e}"))
}

pub async fn pkcs11() -> Store {
    let token = Arc::new(token());
    pkcs11_on(token).await
}

pub async fn pkcs11_on(token: Arc<EphemeralToken>) -> Store {
    let ks = Pkcs11KeyStore::open(token.config()).await.expect("open pkcs11 keystore");
    Store { ks: Arc::new(ks.clone()), pkcs11: Some((ks, token)) }
}

/// A unique key name per call.
pub fn name(hint: &str) -> KeyName {
    use std::sync::atomic::{AtomicU32, Ordering};
    static N: AtomicU32 = AtomicU32::new(0);
    KeyName::new(&format!("{hint}-{}-{}", std::process::id(), N.fetch_add(1, Ordering::Relaxed))).expect("valid name")
}

pub fn who() -> Provenance {
    Provenance::now("3ecfcdf38fcbe141ae26a1030f81e96b753365a46760ae6b578698a97c59fd22")
}

pub fn b64(s: &str) -> Vec<u8> {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.decode(s).expect("base64")
}

/// Generates one `#[tokio::test]` per backend for each listed `async fn(Store)`.
#[macro_export]
macro_rules! on_both_keystores {
    ($($case:ident),* $(,)?) => {
        mod soft {
            $( #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
               async fn $case() { super::$case($crate::harness::soft()).await } )*
        }
        mod pkcs11 {
            $( #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
               async fn $case() { super::$case($crate::harness::pkcs11().await).await } )*
        }
    };
}
