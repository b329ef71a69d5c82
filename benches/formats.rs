//! The per-request CPU work outside the HSM: ciphertext framing per scheme, policy matching
//! and identity hashing. `cargo bench --bench formats`; under `cargo test` each runs once.

use criterion::{black_box, criterion_group, criterion_main, Criterion};
use kesh::crypto::kes::{self, Algorithm};
use kesh::crypto::native;
use kesh::identity::{ApiKey, Identity};
use kesh::server::policy::Policy;

fn ciphertexts(c: &mut Criterion) {
    let iv = [7u8; native::GCM_IV_LEN];
    let sealed = [9u8; 32 + 16];
    let mut g = c.benchmark_group("ciphertext");
    g.bench_function("gcm/encode", |b| {
        b.iter(|| native::encode_gcm(black_box(&iv), black_box(&sealed)))
    });
    let gcm = native::encode_gcm(&iv, &sealed);
    g.bench_function("gcm/parse", |b| {
        b.iter(|| native::parse_gcm(black_box(&gcm)).map(|(iv, rest)| (iv[0], rest.len())))
    });
    let context = br#"{"bucket":"bucket/object"}"#;
    let kwp_key = [3u8; 32];
    g.bench_function("kwp/seal_soft", |b| {
        b.iter(|| native::seal_kwp_soft(black_box(&kwp_key), black_box(&[1u8; 32]), context))
    });
    let kwp = native::seal_kwp_soft(&kwp_key, &[1u8; 32], context);
    g.bench_function("kwp/parse", |b| {
        b.iter(|| native::parse_kwp(black_box(&kwp)).map(|(pad, rest)| (pad, rest.len())))
    });
    let derived = [5u8; 32];
    let kes_iv = [1u8; kes::IV_LEN];
    let nonce = [2u8; kes::NONCE_LEN];
    g.bench_function("kes/seal", |b| {
        b.iter(|| {
            kes::seal(
                Algorithm::Aes256,
                black_box(&derived),
                &kes_iv,
                &nonce,
                black_box(&[1u8; 32]),
                context,
            )
        })
    });
    let kes_ct = kes::seal(
        Algorithm::Aes256,
        &derived,
        &kes_iv,
        &nonce,
        &[1u8; 32],
        context,
    );
    g.bench_function("kes/parse", |b| {
        b.iter(|| kes::parse(black_box(&kes_ct)).map(|p| p.sealed.len()))
    });
    g.bench_function("kes/parse+open", |b| {
        b.iter(|| {
            let parts = kes::parse(black_box(&kes_ct)).expect("parses");
            kes::open(Algorithm::Aes256, &derived, &parts, context).map(|p| p.len())
        })
    });
    g.finish();
}

fn policies(c: &mut Criterion) {
    // MinIO's policy (docs/minio.md §2), plus rules that do not match, checked in order.
    let policy = Policy {
        allow: vec![
            "/v1/key/create/minio-*".into(),
            "/v1/key/describe/minio-*".into(),
            "/v1/key/list/*".into(),
            "/v1/key/generate/minio-*".into(),
            "/v1/key/decrypt/minio-*".into(),
            "/v1/status".into(),
            "/v1/metrics".into(),
        ],
        deny: vec!["/v1/key/delete/*".into(), "/v1/key/import/*".into()],
    };
    let mut g = c.benchmark_group("policy");
    g.bench_function("allows/decrypt", |b| {
        b.iter(|| policy.allows(black_box("/v1/key/decrypt/minio-default-key")))
    });
    g.bench_function("denies/delete", |b| {
        b.iter(|| policy.allows(black_box("/v1/key/delete/minio-default-key")))
    });
    g.finish();
}

fn identities(c: &mut Criterion) {
    let key = ApiKey::generate().expect("random");
    let (cert, _) = key.certificate().expect("certificate");
    c.bench_function("identity/from_certificate", |b| {
        b.iter(|| Identity::from_certificate(black_box(&cert)).map(|i| i.to_string().len()))
    });
}

criterion_group!(benches, ciphertexts, policies, identities);
criterion_main!(benches);
