//! Seal/unseal through the pkcs11 keystore (SoftHSM) against the soft keystore, in one run.
//!
//! `cargo bench --bench keystore` measures; under `cargo test` it runs a few iterations only,
//! to prove it still works. Results are ratios against the soft keystore measured in the same
//! run, since the machines are shared and noisy.

use std::time::{Duration, Instant};

use kesh::keystore::pkcs11::softhsm::EphemeralToken;
use kesh::keystore::pkcs11::Pkcs11KeyStore;
use kesh::keystore::soft::SoftKeyStore;
use kesh::keystore::{KeyStore, Provenance};
use kesh::name::KeyName;

async fn measure(ks: &dyn KeyStore, iterations: u32) -> (Duration, Duration) {
    let name = KeyName::new("bench").expect("valid name");
    ks.create(&name, Provenance::now("bench"))
        .await
        .expect("create");
    let ctx = br#"{"bucket":"bucket/object"}"#;
    let mut cts = Vec::with_capacity(iterations as usize);
    let started = Instant::now();
    for _ in 0..iterations {
        cts.push(ks.generate(&name, ctx).await.expect("generate"));
    }
    let seal = started.elapsed() / iterations;
    let started = Instant::now();
    for dk in &cts {
        let pt = ks
            .decrypt(&name, &dk.ciphertext, ctx)
            .await
            .expect("decrypt");
        assert_eq!(&pt[..], &dk.plaintext[..]);
    }
    (seal, started.elapsed() / iterations)
}

fn main() {
    let measuring = std::env::args().any(|a| a == "--bench");
    let iterations = if measuring { 20_000 } else { 20 };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let token = EphemeralToken::create().expect("SoftHSM is required: apt-get install softhsm2");
        let hsm = Pkcs11KeyStore::open(token.config()).await.expect("open token");
        let soft = SoftKeyStore::in_memory();
        let (soft_seal, soft_open) = measure(&soft, iterations).await;
        let (hsm_seal, hsm_open) = measure(&hsm, iterations).await;
        println!("keystore bench ({iterations} iterations, one caller):");
        println!("  soft   generate {soft_seal:>10.2?}  decrypt {soft_open:>10.2?}");
        println!(
            "  pkcs11 generate {hsm_seal:>10.2?}  decrypt {hsm_open:>10.2?}  ({:.1}x / {:.1}x the soft keystore)",
            hsm_seal.as_secs_f64() / soft_seal.as_secs_f64(),
            hsm_open.as_secs_f64() / soft_open.as_secs_f64()
        );
    });
    kesh::keystore::pkcs11::softhsm::cleanup();
}
