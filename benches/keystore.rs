//! The keystore seam, in one run: a seal (generate) and an unseal (decrypt) through the pkcs11
//! keystore on SoftHSM against the soft keystore and against SoftHSM called directly (the same
//! calls as kesh makes — C_EncryptInit + C_Encrypt with randomness drawn 4 KiB at a time by
//! C_GenerateRandom, C_DecryptInit + C_Decrypt — in the bench thread, on a token key and on a
//! session key: what SoftHSM itself costs, so what kesh adds is the difference), and the
//! name→handle lookup (describe, and generate) on a token holding 10 keys against one holding
//! 10,000.
//!
//! `cargo bench --bench keystore` measures; compare the groups' lines with each other (same
//! run, same machine), not with numbers from another day. Under `cargo test` every benchmark
//! runs once and the big token holds 100 keys instead of 10,000, to stay fast.

mod common;

use std::sync::Arc;

use criterion::{criterion_group, BenchmarkId, Criterion};
use kesh::keystore::pkcs11::ephemeral::EphemeralToken;
use kesh::keystore::pkcs11::Pkcs11KeyStore;
use kesh::keystore::soft::SoftKeyStore;
use kesh::keystore::{KeyStore, Provenance};
use kesh::name::KeyName;
use tokio::runtime::Runtime;

use common::CONTEXT;

fn measuring() -> bool {
    std::env::args().any(|a| a == "--bench")
}

fn runtime() -> Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

fn token() -> EphemeralToken {
    EphemeralToken::create().expect("SoftHSM is required: apt-get install softhsm2")
}

fn seal_unseal(c: &mut Criterion) {
    let rt = runtime();
    let token = token();
    let hsm: Arc<dyn KeyStore> = Arc::new(
        rt.block_on(Pkcs11KeyStore::open(token.config()))
            .expect("open token"),
    );
    let soft: Arc<dyn KeyStore> = Arc::new(SoftKeyStore::in_memory());
    let name = KeyName::new("bench").expect("valid name");
    let mut g = c.benchmark_group("seal_unseal");
    for (backend, ks) in [("soft", &soft), ("pkcs11", &hsm)] {
        rt.block_on(ks.create(&name, Provenance::now("bench")))
            .expect("create");
        g.bench_function(BenchmarkId::new("generate", backend), |b| {
            b.to_async(&rt)
                .iter(|| async { ks.generate(&name, CONTEXT).await.expect("generate") })
        });
        let dk = rt.block_on(ks.generate(&name, CONTEXT)).expect("generate");
        g.bench_function(BenchmarkId::new("decrypt", backend), |b| {
            b.to_async(&rt).iter(|| async {
                let pt = ks
                    .decrypt(&name, &dk.ciphertext, CONTEXT)
                    .await
                    .expect("decrypt");
                assert_eq!(pt.len(), 32);
            })
        });
    }
    for (what, on_token) in [
        ("softhsm-direct-token-key", true),
        ("softhsm-direct-session-key", false),
    ] {
        let direct =
            common::Direct::open(&token.module, &token.label, token.pin().expose(), on_token);
        g.bench_function(BenchmarkId::new("generate", what), |b| {
            b.iter(|| direct.seal())
        });
        let sealed = direct.seal();
        g.bench_function(BenchmarkId::new("decrypt", what), |b| {
            b.iter(|| direct.unseal(&sealed))
        });
    }
    g.finish();
    drop(hsm);
    drop(token);
}

fn lookup(c: &mut Criterion) {
    let rt = runtime();
    let big = if measuring() { 10_000 } else { 100 };
    let mut g = c.benchmark_group("lookup");
    // Every token is made before any keystore opens: SoftHSM crashes when a token is
    // initialised while another thread of the process uses the module (and an open keystore
    // polls its token's change marker in the background).
    let made: Vec<_> = [10, big].into_iter().map(|keys| (keys, token())).collect();
    let mut tokens = Vec::new();
    for (keys, token) in made {
        common::populate(&token.module, &token.label, token.pin().expose(), 0, keys);
        let ks = rt
            .block_on(Pkcs11KeyStore::open(token.config()))
            .expect("open token");
        assert_eq!(ks.indexed_keys(), keys);
        // The last key written: a linear search would find it last.
        let name = KeyName::new(&format!("bulk-{}", keys - 1)).expect("valid name");
        g.bench_function(BenchmarkId::new("describe", keys), |b| {
            b.to_async(&rt)
                .iter(|| async { ks.describe(&name).await.expect("describe") })
        });
        g.bench_function(BenchmarkId::new("generate", keys), |b| {
            b.to_async(&rt)
                .iter(|| async { ks.generate(&name, CONTEXT).await.expect("generate") })
        });
        tokens.push((ks, token));
    }
    g.finish();
    drop(tokens);
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .sample_size(20)
        .warm_up_time(std::time::Duration::from_millis(500))
        .measurement_time(std::time::Duration::from_secs(2));
    targets = seal_unseal, lookup
}

fn main() {
    benches();
    Criterion::default().configure_from_args().final_summary();
    kesh::keystore::pkcs11::ephemeral::cleanup();
}
