//! Key versions cost nothing per request: generate and decrypt on a key with 1 version against
//! a key with 10 (nine rotations), on the soft keystore and the pkcs11 keystore on SoftHSM.
//! Decrypt is measured for a ciphertext of the newest version and, on the 10-version key, of
//! version 1 (the oldest, whose ciphertexts carry no version envelope).
//!
//! `cargo bench --bench versions` measures; compare `…/1-version` with `…/10-versions` lines
//! of the same run. Under `cargo test` every benchmark runs once.

use std::sync::Arc;

use criterion::{criterion_group, BenchmarkId, Criterion};
use kesh::keystore::pkcs11::ephemeral::EphemeralToken;
use kesh::keystore::pkcs11::Pkcs11KeyStore;
use kesh::keystore::soft::SoftKeyStore;
use kesh::keystore::{KeyStore, Provenance};
use kesh::name::KeyName;
use tokio::runtime::Runtime;

const CONTEXT: &[u8] = br#"{"bucket":"bucket/objects/0001.bin"}"#;

fn runtime() -> Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

fn versions(c: &mut Criterion) {
    let rt = runtime();
    let token = EphemeralToken::create().expect("SoftHSM is required: apt-get install softhsm2");
    let hsm: Arc<dyn KeyStore> = Arc::new(
        rt.block_on(Pkcs11KeyStore::open(token.config()))
            .expect("open token"),
    );
    let soft: Arc<dyn KeyStore> = Arc::new(SoftKeyStore::in_memory());
    let mut g = c.benchmark_group("versions");
    for (backend, ks) in [("soft", &soft), ("pkcs11", &hsm)] {
        let one = KeyName::new("one").expect("valid name");
        let ten = KeyName::new("ten").expect("valid name");
        rt.block_on(async {
            ks.create(&one, Provenance::now("bench")).await?;
            ks.create(&ten, Provenance::now("bench")).await?;
            for _ in 0..9 {
                ks.rotate(&ten, Provenance::now("bench")).await?;
            }
            Ok::<_, kesh::keystore::KeystoreError>(())
        })
        .expect("create and rotate");
        let oldest = rt
            .block_on(async {
                // A version-1 ciphertext of a key rotated nine times since it was sealed.
                ks.create(
                    &KeyName::new("twin").expect("valid"),
                    Provenance::now("bench"),
                )
                .await?;
                let twin = KeyName::new("twin").expect("valid");
                let dk = ks.generate(&twin, CONTEXT).await?;
                for _ in 0..9 {
                    ks.rotate(&twin, Provenance::now("bench")).await?;
                }
                Ok::<_, kesh::keystore::KeystoreError>((twin, dk))
            })
            .expect("twin");
        for (label, name) in [("1-version", &one), ("10-versions", &ten)] {
            g.bench_function(
                BenchmarkId::new(format!("generate/{backend}"), label),
                |b| {
                    b.to_async(&rt)
                        .iter(|| async { ks.generate(name, CONTEXT).await.expect("generate") })
                },
            );
            let dk = rt.block_on(ks.generate(name, CONTEXT)).expect("generate");
            g.bench_function(
                BenchmarkId::new(format!("decrypt-newest/{backend}"), label),
                |b| {
                    b.to_async(&rt).iter(|| async {
                        let pt = ks
                            .decrypt(name, &dk.ciphertext, CONTEXT)
                            .await
                            .expect("decrypt");
                        assert_eq!(pt.len(), 32);
                    })
                },
            );
        }
        interleaved_ratio(&rt, ks, backend, &one, &ten);
        let (twin, dk) = &oldest;
        g.bench_function(
            BenchmarkId::new(format!("decrypt-version-1/{backend}"), "10-versions"),
            |b| {
                b.to_async(&rt).iter(|| async {
                    let pt = ks
                        .decrypt(twin, &dk.ciphertext, CONTEXT)
                        .await
                        .expect("decrypt");
                    assert_eq!(pt.len(), 32);
                })
            },
        );
    }
    g.finish();
    drop(hsm);
    drop(token);
}

/// The 10-version/1-version ratio of generate and of decrypt (newest version), from rounds
/// that alternate the two keys, so load from other processes (which drifts over seconds)
/// falls on both alike; the median of the per-round ratios is printed.
fn interleaved_ratio(
    rt: &Runtime,
    ks: &Arc<dyn KeyStore>,
    backend: &str,
    one: &KeyName,
    ten: &KeyName,
) {
    let measuring = std::env::args().any(|a| a == "--bench");
    let (rounds, batch) = if measuring { (41, 300) } else { (1, 1) };
    let cts = rt
        .block_on(async {
            Ok::<_, kesh::keystore::KeystoreError>((
                ks.generate(one, CONTEXT).await?.ciphertext,
                ks.generate(ten, CONTEXT).await?.ciphertext,
            ))
        })
        .expect("generate");
    let time = |name: &KeyName, ct: &[u8], decrypt: bool| {
        let start = std::time::Instant::now();
        rt.block_on(async {
            for _ in 0..batch {
                if decrypt {
                    ks.decrypt(name, ct, CONTEXT).await.expect("decrypt");
                } else {
                    ks.generate(name, CONTEXT).await.expect("generate");
                }
            }
        });
        start.elapsed().as_secs_f64()
    };
    for (op, decrypt) in [("generate", false), ("decrypt", true)] {
        let mut ratios: Vec<f64> = (0..rounds)
            .map(|i| {
                // Alternate which key goes first, so neither always runs warm.
                let (t1, t10) = if i % 2 == 0 {
                    let t1 = time(one, &cts.0, decrypt);
                    (t1, time(ten, &cts.1, decrypt))
                } else {
                    let t10 = time(ten, &cts.1, decrypt);
                    (time(one, &cts.0, decrypt), t10)
                };
                t10 / t1
            })
            .collect();
        ratios.sort_by(f64::total_cmp);
        println!(
            "versions: {op} on {backend}, 10 versions / 1 version = {:.3} (median of {rounds} alternating rounds of {batch})",
            ratios[ratios.len() / 2]
        );
    }
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(std::time::Duration::from_millis(500))
        .measurement_time(std::time::Duration::from_secs(3));
    targets = versions
}

fn main() {
    benches();
    Criterion::default().configure_from_args().final_summary();
    kesh::keystore::pkcs11::ephemeral::cleanup();
}
