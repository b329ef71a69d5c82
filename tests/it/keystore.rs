//! The KeyStore suite: every operation, run on the soft keystore, on SoftHSM and on Kryoptic,
//! plus the PKCS#11-only checks (templates on the token, processes sharing a token, scale).

use std::sync::Arc;

use kesh::crypto::kes::Algorithm;
use kesh::keystore::{HmacKeySource, ImportKey, KeystoreError, Scheme};
use kesh::name::KeyName;
use zeroize::Zeroizing;

use crate::harness::{self, b64, Store};

crate::on_every_keystore!(
    lifecycle,
    generate_and_decrypt,
    tampered_truncated_and_wrong_context,
    encrypt_any_size,
    unknown_keys,
    hmac_per_key,
    kes_vectors,
    format_vectors,
    kwp_scheme_round_trip,
    created_keys_in_every_scheme,
    concurrent_create_yields_one_key,
    list_by_prefix,
    conformance,
);

fn import(key: [u8; 32], scheme: Scheme, hmac: HmacKeySource) -> ImportKey {
    ImportKey {
        key: Zeroizing::new(key),
        algorithm: Algorithm::Aes256,
        scheme,
        hmac,
        provenance: harness::who(),
    }
}

async fn lifecycle(ks: Store) {
    let n = harness::name("life");
    ks.create(&n, harness::who()).await.unwrap();
    let info = ks.describe(&n).await.unwrap();
    assert_eq!(
        (info.scheme, info.algorithm, info.name.clone()),
        (Scheme::Gcm, Algorithm::Aes256, n.clone())
    );
    assert_eq!(info.created_by, harness::who().created_by);
    assert!(
        (time::OffsetDateTime::now_utc() - info.created_at)
            .whole_seconds()
            .abs()
            < 60
    );
    assert_eq!(
        ks.create(&n, harness::who()).await,
        Err(KeystoreError::KeyExists)
    );
    assert_eq!(
        ks.import(&n, import([1; 32], Scheme::Kes, HmacKeySource::Generate))
            .await,
        Err(KeystoreError::KeyExists)
    );
    assert_eq!(ks.list(n.as_str()).await.unwrap(), vec![n.clone()]);
    ks.delete(&n).await.unwrap();
    assert_eq!(ks.describe(&n).await, Err(KeystoreError::KeyNotFound));
    assert_eq!(ks.delete(&n).await, Err(KeystoreError::KeyNotFound));
    assert!(ks.list(n.as_str()).await.unwrap().is_empty());
    // The name is free again, and the new key is a different key.
    ks.create(&n, harness::who()).await.unwrap();
    ks.status().await.unwrap();
}

async fn generate_and_decrypt(ks: Store) {
    let n = harness::name("gen");
    ks.create(&n, harness::who()).await.unwrap();
    let ctx = br#"{"bucket":"bucket/object"}"#;
    let a = ks.generate(&n, ctx).await.unwrap();
    let b = ks.generate(&n, ctx).await.unwrap();
    assert_ne!(a.plaintext, b.plaintext, "DEKs must be fresh");
    assert_ne!(a.ciphertext, b.ciphertext);
    assert_eq!(
        a.ciphertext.len(),
        63,
        "gcm: 3-byte header, 12-byte IV, 32-byte DEK, 16-byte tag"
    );
    assert_eq!(
        &ks.decrypt(&n, &a.ciphertext, ctx).await.unwrap()[..],
        &a.plaintext[..]
    );
    let empty = ks.generate(&n, b"").await.unwrap();
    assert_eq!(
        &ks.decrypt(&n, &empty.ciphertext, b"").await.unwrap()[..],
        &empty.plaintext[..]
    );
}

async fn tampered_truncated_and_wrong_context(ks: Store) {
    let n = harness::name("tamper");
    ks.create(&n, harness::who()).await.unwrap();
    let dk = ks.generate(&n, b"ctx").await.unwrap();
    assert_eq!(
        ks.decrypt(&n, &dk.ciphertext, b"ctX").await.unwrap_err(),
        KeystoreError::NotAuthentic
    );
    for i in [0, 1, 2, 3, 14, 15, 40, dk.ciphertext.len() - 1] {
        let mut bad = dk.ciphertext.clone();
        bad[i] ^= 0x01;
        assert_eq!(
            ks.decrypt(&n, &bad, b"ctx").await.unwrap_err(),
            KeystoreError::NotAuthentic,
            "flipped byte {i}"
        );
    }
    for len in [0, 1, 3, 15, 30, dk.ciphertext.len() - 1] {
        assert_eq!(
            ks.decrypt(&n, &dk.ciphertext[..len], b"ctx")
                .await
                .unwrap_err(),
            KeystoreError::NotAuthentic,
            "truncated to {len}"
        );
    }
    let other = harness::name("tamper-other");
    ks.create(&other, harness::who()).await.unwrap();
    assert_eq!(
        ks.decrypt(&other, &dk.ciphertext, b"ctx")
            .await
            .unwrap_err(),
        KeystoreError::NotAuthentic
    );
}

async fn encrypt_any_size(ks: Store) {
    let n = harness::name("enc");
    ks.create(&n, harness::who()).await.unwrap();
    for len in [0usize, 1, 100, 65_536] {
        let pt: Vec<u8> = (0..len).map(|i| i as u8).collect();
        let ct = ks.encrypt(&n, &pt, b"c").await.unwrap();
        assert_eq!(
            &ks.decrypt(&n, &ct, b"c").await.unwrap()[..],
            &pt[..],
            "len {len}"
        );
    }
}

async fn unknown_keys(ks: Store) {
    let n = harness::name("nope");
    assert_eq!(
        ks.describe(&n).await.unwrap_err(),
        KeystoreError::KeyNotFound
    );
    assert_eq!(
        ks.generate(&n, b"").await.unwrap_err(),
        KeystoreError::KeyNotFound
    );
    assert_eq!(
        ks.encrypt(&n, b"x", b"").await.unwrap_err(),
        KeystoreError::KeyNotFound
    );
    assert_eq!(
        ks.decrypt(&n, &[0u8; 63], b"").await.unwrap_err(),
        KeystoreError::KeyNotFound
    );
    assert_eq!(
        ks.hmac(&n, b"m").await.unwrap_err(),
        KeystoreError::KeyNotFound
    );
    assert_eq!(ks.delete(&n).await.unwrap_err(), KeystoreError::KeyNotFound);
    // A flood of lookups of one unknown name stays an answer, not an error.
    for _ in 0..50 {
        assert_eq!(
            ks.describe(&n).await.unwrap_err(),
            KeystoreError::KeyNotFound
        );
    }
}

async fn hmac_per_key(ks: Store) {
    let (a, b) = (harness::name("mac-a"), harness::name("mac-b"));
    ks.create(&a, harness::who()).await.unwrap();
    ks.create(&b, harness::who()).await.unwrap();
    let ha = ks.hmac(&a, b"message").await.unwrap();
    assert_eq!(ha, ks.hmac(&a, b"message").await.unwrap(), "deterministic");
    assert_ne!(ha, ks.hmac(&b, b"message").await.unwrap(), "per key");
    // A migrated KES key keeps its HMAC key, so HMACs answer as they did under KES.
    let given = harness::name("mac-given");
    let key: [u8; 32] = core::array::from_fn(|i| i as u8);
    ks.import(
        &given,
        import(
            [9; 32],
            Scheme::Kes,
            HmacKeySource::Given(Zeroizing::new(key)),
        ),
    )
    .await
    .unwrap();
    assert_eq!(
        hex::encode(ks.hmac(&given, b"message").await.unwrap()),
        "6297b77508a1a30ea4dfadd8f847c31b49aba45de10a79daf721d3f7ec112a24"
    );
    // Legacy KES keys had no HMAC key.
    let legacy = harness::name("mac-legacy");
    ks.import(&legacy, import([9; 32], Scheme::Kes, HmacKeySource::None))
        .await
        .unwrap();
    assert_eq!(
        ks.hmac(&legacy, b"m").await.unwrap_err(),
        KeystoreError::HmacUnsupported
    );
}

/// KES's vectors (docs/FORMAT.md §5) through the keystore: the `kes` scheme decrypts what KES wrote.
async fn kes_vectors(ks: Store) {
    let zero = harness::name("kes-zero");
    ks.import(&zero, import([0; 32], Scheme::Kes, HmacKeySource::Generate))
        .await
        .unwrap();
    assert_eq!(ks.describe(&zero).await.unwrap().scheme, Scheme::Kes);
    let vectors: [&[u8]; 3] = [
        &b64("zwdDgHeRlIFRnJ7+DIhs/ka7GFK2CFSfDELqg1VCyTQzZ58o7MAdupMLk3ZjlMo2ZUDwldL2o41nAWDc"),
        br#"{"aead":"AES-256-GCM-HMAC-SHA-256","iv":"xLxIN3tSCkg2xMafuvwUwg==","nonce":"gu0mGwUkwcvMEoi5","bytes":"WVgRjeIJm3w50C/l+y7y2i6mbNg5NCAqN1zvOYWZKmc="}"#,
        &b64("lbFBRVMyNTYtR0NNX1NIQTI1NtkgNjY2ODdhYWRmODYyYmQ3NzZjOGZjMThiOGU5ZjhlMjDEEExv7LAd4oz0SaHZrX5LBufEDEKME1ow1CDfUFrqv8QgJuy7Sw+jVqz99TK1HV851LT3K4mwwDv46TB2ngWkAJQ="),
    ];
    for v in vectors {
        assert_eq!(&ks.decrypt(&zero, v, b"").await.unwrap()[..], &[0u8; 16]);
    }
    let keyed = harness::name("kes-keyed");
    let key: [u8; 32] = b64("dDHbTWgo+Yh3u804SYB5OyVMy6RiLeJYBQth1f6KlEU=")
        .try_into()
        .unwrap();
    ks.import(&keyed, import(key, Scheme::Kes, HmacKeySource::Generate))
        .await
        .unwrap();
    let ct = b64("s2gmfQHeGdlyL8x1yEWSACUV3GrSoz3t160hugMgzKWgyqesXDVUJ5Dw5Mt076rR1PNiU9X4YjLH14D8a81t2r2xsz4gVZac");
    assert_eq!(
        &ks.decrypt(&keyed, &ct, &[0u8; 16]).await.unwrap()[..],
        &b64("CLcJoykFCWZDkEIiUq9bJRqwCwW9ZDvdgu8EMA==")[..]
    );
    assert_eq!(
        ks.decrypt(&keyed, &ct, b"").await.unwrap_err(),
        KeystoreError::NotAuthentic
    );
    // What the `kes` scheme seals is KES's format: 76 bytes for a DEK.
    let dk = ks.generate(&keyed, b"c").await.unwrap();
    assert_eq!(dk.ciphertext.len(), 76);
    assert_eq!(
        &ks.decrypt(&keyed, &dk.ciphertext, b"c").await.unwrap()[..],
        &dk.plaintext[..]
    );

    // ChaCha20 keys: the soft keystore serves them; an HSM cannot compute HChaCha20, so the
    // pkcs11 keystore refuses them plainly instead of pulling the key out of the device.
    let chacha = harness::name("kes-chacha");
    let imp = ImportKey {
        algorithm: Algorithm::ChaCha20,
        ..import(key, Scheme::Kes, HmacKeySource::Generate)
    };
    let ct = b64("gO4woRIswAJdjUjW7z2ApsSQxJlwB24yjLrmH4eI7sB0uh5nfEJfk9ybTPFft5FRFaZCVBmzhx7OJs9n0WWtxH3sySIxecIK");
    if ks.pkcs11.is_some() {
        assert_eq!(
            ks.import(&chacha, imp).await,
            Err(KeystoreError::AlgorithmUnsupported("ChaCha20"))
        );
        assert_eq!(
            ks.describe(&chacha).await,
            Err(KeystoreError::KeyNotFound),
            "nothing half-created"
        );
    } else {
        ks.import(&chacha, imp).await.unwrap();
        assert_eq!(
            &ks.decrypt(&chacha, &ct, &[0u8; 16]).await.unwrap()[..],
            &b64("CLcJoykFCWZDkEIiUq9bJRqwCwW9ZDvdgu8EMA==")[..]
        );
    }
}

/// The vectors of `docs/FORMAT.md` §4 (computed independently with Python `cryptography`).
pub const FORMAT_KEY: [u8; 32] = [
    0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25,
    26, 27, 28, 29, 30, 31,
];
pub const FORMAT_CONTEXT: &[u8] = br#"{"bucket":"bucket/object"}"#;
pub const FORMAT_GCM: &str =
    "awEBoKGio6Slpqeoqaqrplk+bgGORPgqLM2YSzeOkSD9C0PG4hQ7xFd83SP2K16KN0Kb/euPNvDLhuJ4ib82";
pub const FORMAT_KWP: &str = "awECALowQydQFbEAWQFgSAvxK5MdYqUuSOecDkQMpS2BPb0LG0kPmvkbrRdPd4bjBs3/hfjWLpCfd/5+GhQemyVsj+rYiDfz7e60Eg==";
pub const FORMAT_KWP_SHORT: &str =
    "awECA8UwJPhsQ5hqbeLsBzvatumgi1LvnBe0Af0yaFe82eDdZZhU6Ho9xQvkRoZgG3lRpg==";

/// Whether the backend has the `kwp` scheme. One without it by design says so in the test's
/// output, and must refuse a kwp key plainly and up front (an import, a server configured to
/// create them) rather than store a key every use of which fails.
async fn has_kwp(ks: &Store) -> bool {
    if ks.backend.kwp() {
        return true;
    }
    ks.backend.unsupported("kwp");
    let n = harness::name("no-kwp");
    assert_eq!(
        ks.import(&n, import([5; 32], Scheme::Kwp, HmacKeySource::Generate))
            .await
            .unwrap_err(),
        KeystoreError::AlgorithmUnsupported(
            "kwp (CKM_AES_KEY_WRAP_PAD, which this token does not offer)"
        )
    );
    assert_eq!(
        ks.describe(&n).await.unwrap_err(),
        KeystoreError::KeyNotFound,
        "a refused import leaves nothing behind"
    );
    let (_, token) = ks.pkcs11.as_ref().expect("only a token lacks kwp");
    let mut cfg = harness::config(token);
    cfg.scheme = Some(Scheme::Kwp);
    match kesh::keystore::pkcs11::Pkcs11KeyStore::open(cfg).await {
        Err(KeystoreError::InvalidInput(why)) => {
            let why = why.to_string();
            assert!(why.contains("`scheme: kwp`: "), "{why}");
            assert!(why.contains("CKM_AES_KEY_WRAP_PAD"), "{why}");
        }
        other => panic!("a keystore creating kwp keys opened on a token without KWP: {other:?}"),
    }
    false
}

async fn format_vectors(ks: Store) {
    let dek: Vec<u8> = (0x40..0x60).collect();
    // The format key imported under `scheme` opens that scheme's vector.
    let imported = |hint: &'static str, scheme: Scheme, vector: &'static str| {
        let ks = &ks;
        async move {
            let name = harness::name(hint);
            ks.import(&name, import(FORMAT_KEY, scheme, HmacKeySource::Generate))
                .await
                .unwrap();
            let opened = ks
                .decrypt(&name, &b64(vector), FORMAT_CONTEXT)
                .await
                .unwrap();
            (name, opened)
        }
    };
    let (_, opened) = imported("fmt-gcm", Scheme::Gcm, FORMAT_GCM).await;
    assert_eq!(&opened[..], &dek[..]);
    if !has_kwp(&ks).await {
        return;
    }
    let (kwp, opened) = imported("fmt-kwp", Scheme::Kwp, FORMAT_KWP).await;
    assert_eq!(&opened[..], &dek[..]);
    assert_eq!(
        &ks.decrypt(&kwp, &b64(FORMAT_KWP_SHORT), FORMAT_CONTEXT)
            .await
            .unwrap()[..],
        b"hello"
    );
    // KWP is deterministic: sealing the same DEK under the same context gives the vector.
    assert_eq!(
        ks.encrypt(&kwp, &dek, FORMAT_CONTEXT).await.unwrap(),
        b64(FORMAT_KWP)
    );
    assert_eq!(
        ks.encrypt(&kwp, b"hello", FORMAT_CONTEXT).await.unwrap(),
        b64(FORMAT_KWP_SHORT)
    );
}

async fn kwp_scheme_round_trip(ks: Store) {
    if !has_kwp(&ks).await {
        return;
    }
    let n = harness::name("kwp");
    ks.import(&n, import([5; 32], Scheme::Kwp, HmacKeySource::Generate))
        .await
        .unwrap();
    let dk = ks.generate(&n, b"ctx").await.unwrap();
    assert_eq!(dk.ciphertext.len(), 4 + 72);
    assert_eq!(
        &ks.decrypt(&n, &dk.ciphertext, b"ctx").await.unwrap()[..],
        &dk.plaintext[..]
    );
    assert_eq!(
        ks.decrypt(&n, &dk.ciphertext, b"xtc").await.unwrap_err(),
        KeystoreError::NotAuthentic
    );
    let mut bad = dk.ciphertext.clone();
    bad[10] ^= 1;
    assert_eq!(
        ks.decrypt(&n, &bad, b"ctx").await.unwrap_err(),
        KeystoreError::NotAuthentic
    );
}

/// `scheme:` for created keys: `kwp` for HSMs without GCM, `kes` for those with neither GCM
/// nor KWP (YubiHSM 2). A created `kes` key seals in KES's own format.
async fn created_keys_in_every_scheme(ks: Store) {
    for scheme in [Scheme::Gcm, Scheme::Kwp, Scheme::Kes] {
        if scheme == Scheme::Kwp && !has_kwp(&ks).await {
            continue;
        }
        let store = ks.creating(scheme).await;
        let n = harness::name(&format!("made-{scheme}"));
        store.create(&n, harness::who()).await.unwrap();
        let info = store.describe(&n).await.unwrap();
        assert_eq!((info.scheme, info.algorithm), (scheme, Algorithm::Aes256));
        let dk = store.generate(&n, b"ctx").await.unwrap();
        assert_eq!(
            &store.decrypt(&n, &dk.ciphertext, b"ctx").await.unwrap()[..],
            &dk.plaintext[..],
            "{scheme}"
        );
        assert_eq!(
            store.decrypt(&n, &dk.ciphertext, b"xtc").await.unwrap_err(),
            KeystoreError::NotAuthentic,
            "{scheme}"
        );
        if scheme == Scheme::Kes {
            assert!(kesh::crypto::kes::parse(&dk.ciphertext).is_ok());
        }
        store.hmac(&n, b"msg").await.unwrap();
    }
}

/// What a backend cannot do by design, and why: every other failure fails the matrix.
fn unsupported_by_design(backend: &str, scheme: Scheme, op: &str) -> Option<&'static str> {
    match (backend, scheme, op) {
        ("soft", _, _) => None,
        (_, Scheme::Kes, "import chacha20") => {
            Some("no PKCS#11 mechanism computes HChaCha20 on the device")
        }
        _ => None,
    }
}

/// The conformance matrix row of one backend: every operation in every scheme, recorded as
/// `conformance | <backend> | <scheme> | <operation> | <verdict>` for `softhsm-tests/run` to
/// collect into docs/hsm-support.md; any failure not expected by design fails the test.
async fn conformance(ks: Store) {
    let backend = ks.backend.name();
    let mut failures = Vec::new();
    for scheme in [Scheme::Gcm, Scheme::Kwp, Scheme::Kes] {
        if !ks.backend.kwp() && scheme == Scheme::Kwp {
            // The token lacks the scheme's mechanism: a keystore creating such keys does not
            // start (tested in the suite), and an import of one is refused, so none
            // half-works.
            let refused = ks
                .import(
                    &harness::name("conf-kwp-refused"),
                    import([9; 32], scheme, HmacKeySource::Generate),
                )
                .await
                .unwrap_err();
            assert!(
                matches!(refused, KeystoreError::AlgorithmUnsupported(_)),
                "{refused:?}"
            );
            for op in ["create", "import aes256"] {
                harness::report(&format!(
                    "conformance | {backend} | {scheme} | {op} | unsupported-by-design (no CKM_AES_KEY_WRAP_PAD: {refused})"
                ));
            }
            continue;
        }
        let store = ks.creating(scheme).await;
        let n = harness::name(&format!("conf-{scheme}"));
        let imported = harness::name(&format!("conf-imp-{scheme}"));
        let chacha = harness::name(&format!("conf-cc-{scheme}"));
        let mut record = |op: &str, outcome: Result<(), String>| {
            let verdict = match (&outcome, unsupported_by_design(backend, scheme, op)) {
                (Ok(()), _) => "pass".to_owned(),
                (Err(_), Some(why)) => format!("unsupported-by-design ({why})"),
                (Err(e), None) => {
                    failures.push(format!("{backend} {scheme} {op}: {e}"));
                    format!("FAIL ({e})")
                }
            };
            harness::report(&format!(
                "conformance | {backend} | {scheme} | {op} | {verdict}"
            ));
        };
        let err = |e: KeystoreError| e.to_string();
        let created = store.create(&n, harness::who()).await;
        record("create", created.map_err(err));
        let dk = store.generate(&n, b"ctx").await;
        let generated = dk.as_ref().map(drop).map_err(|e| e.to_string());
        record("generate", generated);
        if let Ok(dk) = &dk {
            let back = store.decrypt(&n, &dk.ciphertext, b"ctx").await;
            record(
                "decrypt",
                match back {
                    Ok(p) if p[..] == dk.plaintext[..] => Ok(()),
                    Ok(_) => Err("different plaintext".into()),
                    Err(e) => Err(e.to_string()),
                },
            );
            record(
                "refuse a wrong context",
                match store.decrypt(&n, &dk.ciphertext, b"xtc").await {
                    Err(KeystoreError::NotAuthentic) => Ok(()),
                    other => Err(format!("{other:?}")),
                },
            );
        }
        let big = vec![7u8; 4096];
        let sealed = store.encrypt(&n, &big, b"").await;
        record(
            "encrypt 4 KiB",
            match &sealed {
                Ok(ct) => match store.decrypt(&n, ct, b"").await {
                    Ok(p) if p[..] == big[..] => Ok(()),
                    other => Err(format!("{:?}", other.map(|_| "different plaintext"))),
                },
                Err(e) => Err(e.to_string()),
            },
        );
        record("hmac", store.hmac(&n, b"msg").await.map(drop).map_err(err));
        record(
            "import aes256",
            store
                .import(&imported, import([9; 32], scheme, HmacKeySource::Generate))
                .await
                .map_err(err),
        );
        if scheme == Scheme::Kes {
            let mut key = import([3; 32], scheme, HmacKeySource::Generate);
            key.algorithm = Algorithm::ChaCha20;
            record(
                "import chacha20",
                store.import(&chacha, key).await.map_err(err),
            );
        }
        record(
            "list",
            match store.list(n.as_str()).await {
                Ok(names) if names == vec![n.clone()] => Ok(()),
                other => Err(format!("{other:?}")),
            },
        );
        record("delete", store.delete(&n).await.map_err(err));
        let _ = store.delete(&imported).await;
    }
    assert!(failures.is_empty(), "{failures:#?}");
}

async fn concurrent_create_yields_one_key(ks: Store) {
    let n = harness::name("race");
    let ks = Arc::new(ks);
    let tasks: Vec<_> = (0..12)
        .map(|_| {
            let (ks, n) = (ks.clone(), n.clone());
            tokio::spawn(async move { ks.create(&n, harness::who()).await })
        })
        .collect();
    let mut ok = 0;
    for t in tasks {
        match t.await.unwrap() {
            Ok(()) => ok += 1,
            Err(e) => assert_eq!(e, KeystoreError::KeyExists),
        }
    }
    assert_eq!(ok, 1, "exactly one create wins");
    assert_eq!(ks.list(n.as_str()).await.unwrap().len(), 1);
}

async fn list_by_prefix(ks: Store) {
    let stem = harness::name("ls");
    let names: Vec<KeyName> = ["b", "a", "c-1", "c-2"]
        .iter()
        .map(|s| KeyName::new(&format!("{stem}-{s}")).unwrap())
        .collect();
    for n in &names {
        ks.create(n, harness::who()).await.unwrap();
    }
    let all = ks.list(stem.as_str()).await.unwrap();
    let mut sorted = names.clone();
    sorted.sort();
    assert_eq!(all, sorted, "sorted bytewise");
    assert_eq!(ks.list(&format!("{stem}-c")).await.unwrap().len(), 2);
    assert!(ks.list(&format!("{stem}-zzz")).await.unwrap().is_empty());
    assert!(ks.list("").await.unwrap().len() >= 4);
}

mod pkcs11_only {
    //! What only a token can show: the objects' attributes, sharing with other processes,
    //! cross-backend bytes, and scale.

    use std::process::Command;
    use std::time::Instant;

    use cryptoki::mechanism::{Mechanism, MechanismType};
    use cryptoki::object::{Attribute, AttributeType, ObjectClass, ObjectHandle};
    use cryptoki::session::Session;
    use kesh::keystore::pkcs11::ephemeral::EphemeralToken;
    use kesh::keystore::pkcs11::{copies, device, objects, Pkcs11KeyStore, TokenSelector};
    use kesh::keystore::soft::SoftKeyStore;
    use kesh::keystore::KeyStore;

    use super::*;

    fn objects_labelled(s: &Session, label: &str) -> Vec<ObjectHandle> {
        s.find_objects(&[
            Attribute::Class(ObjectClass::SECRET_KEY),
            Attribute::Label(label.as_bytes().to_vec()),
        ])
        .unwrap()
    }

    fn bool_attr(s: &Session, h: ObjectHandle, t: AttributeType) -> bool {
        match s.get_attributes(h, &[t]).unwrap().pop() {
            Some(
                Attribute::Token(b)
                | Attribute::Private(b)
                | Attribute::Sensitive(b)
                | Attribute::Extractable(b),
            )
            | Some(
                Attribute::NeverExtractable(b)
                | Attribute::AlwaysSensitive(b)
                | Attribute::Derive(b)
                | Attribute::Sign(b),
            )
            | Some(
                Attribute::Verify(b)
                | Attribute::Wrap(b)
                | Attribute::Unwrap(b)
                | Attribute::Encrypt(b)
                | Attribute::Decrypt(b),
            ) => b,
            other => panic!("{t:?}: {other:?}"),
        }
    }

    fn allowed(s: &Session, h: ObjectHandle) -> Vec<MechanismType> {
        match s
            .get_attributes(h, &[AttributeType::AllowedMechanisms])
            .unwrap()
            .pop()
        {
            Some(Attribute::AllowedMechanisms(m)) => m,
            other => panic!("{other:?}"),
        }
    }

    fn meta(s: &Session, h: ObjectHandle) -> objects::Meta {
        match s.get_attributes(h, &[AttributeType::Id]).unwrap().pop() {
            Some(Attribute::Id(id)) => objects::Meta::decode(&id).expect("kesh metadata"),
            other => panic!("{other:?}"),
        }
    }

    fn role(s: &Session, h: ObjectHandle) -> objects::Role {
        meta(s, h).role
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn templates_hold_on_the_token() {
        templates_hold(harness::pkcs11().await).await
    }

    async fn templates_hold(store: Store) {
        let (_, token) = store.pkcs11.as_ref().unwrap();
        let (gcm, kes, kwp) = (
            harness::name("tpl-gcm"),
            harness::name("tpl-kes"),
            harness::name("tpl-kwp"),
        );
        store.create(&gcm, harness::who()).await.unwrap();
        store
            .import(&kes, import([3; 32], Scheme::Kes, HmacKeySource::Generate))
            .await
            .unwrap();
        let mut schemes = vec![(&gcm, Scheme::Gcm), (&kes, Scheme::Kes)];
        if has_kwp(&store).await {
            store
                .import(&kwp, import([4; 32], Scheme::Kwp, HmacKeySource::Generate))
                .await
                .unwrap();
            schemes.push((&kwp, Scheme::Kwp));
        }
        let schemes = schemes;
        // Use each key and its HMAC key, so the session copies exist too; then rotate it and
        // use version 2, whose master object must be made to the same template.
        for &(name, _) in &schemes {
            store.generate(name, b"ctx").await.unwrap();
            store.hmac(name, b"msg").await.unwrap();
            assert_eq!(store.rotate(name, harness::who()).await.unwrap(), 2);
            store.generate(name, b"ctx").await.unwrap();
        }
        let (_ctx, s) = harness::raw_session(token);
        for &(name, scheme) in &schemes {
            let handles = objects_labelled(&s, &format!("kesh/{name}"));
            assert_eq!(
                handles.len(),
                3,
                "version 1's master key, its HMAC key, version 2's master key"
            );
            let versions: Vec<u32> = handles
                .iter()
                .filter(|h| role(&s, **h) == objects::Role::Key)
                .map(|h| meta(&s, *h).version)
                .collect();
            assert_eq!(versions.len(), 2);
            assert!(
                versions.contains(&1) && versions.contains(&2),
                "{versions:?}"
            );
            for h in handles {
                let wraps = scheme == Scheme::Kwp && role(&s, h) == objects::Role::Key;
                for (t, want) in [
                    (AttributeType::Token, true),
                    (AttributeType::Private, true),
                    (AttributeType::Sensitive, true),
                    (AttributeType::Extractable, false),
                    (AttributeType::Derive, false),
                    (AttributeType::Wrap, wraps),
                    (AttributeType::Unwrap, wraps),
                ] {
                    assert_eq!(bool_attr(&s, h, t), want, "{name} {t:?}");
                }
                match role(&s, h) {
                    objects::Role::Key => {
                        assert_eq!(allowed(&s, h), vec![objects::scheme_mechanism(scheme)]);
                        assert!(!bool_attr(&s, h, AttributeType::Verify));
                        assert_eq!(bool_attr(&s, h, AttributeType::Sign), scheme == Scheme::Kes);
                        assert_eq!(
                            bool_attr(&s, h, AttributeType::Encrypt),
                            scheme == Scheme::Gcm
                        );
                        // Generated keys were never extractable; imported ones came from
                        // outside. Versions ≥ 2 are always generated on the device.
                        assert_eq!(
                            bool_attr(&s, h, AttributeType::NeverExtractable),
                            scheme == Scheme::Gcm || meta(&s, h).version >= 2
                        );
                        assert!(
                            s.get_attributes(h, &[AttributeType::Value])
                                .map(|a| a.is_empty())
                                .unwrap_or(true),
                            "value readable"
                        );
                        if scheme == Scheme::Gcm {
                            // Only CKM_AES_GCM: CBC (a classic way to recover GCM keystreams) is refused.
                            let cbc = s.encrypt(&Mechanism::AesCbcPad([0; 16]), h, &[0u8; 16]);
                            assert!(
                                cbc.is_err(),
                                "AES-CBC must be refused by CKA_ALLOWED_MECHANISMS"
                            );
                        }
                    }
                    objects::Role::Hmac => {
                        assert_eq!(allowed(&s, h), vec![MechanismType::SHA256_HMAC]);
                        assert!(
                            bool_attr(&s, h, AttributeType::Sign)
                                && bool_attr(&s, h, AttributeType::Verify)
                        );
                        assert!(
                            !bool_attr(&s, h, AttributeType::Encrypt)
                                && !bool_attr(&s, h, AttributeType::Decrypt)
                        );
                    }
                }
            }
        }
        // The session copies the keystore works with (softhsm profile): unlabelled session
        // objects, as locked down as the token objects they copy.
        if !store.pkcs11.as_ref().unwrap().0.settings().session_keys {
            return;
        }
        let copies = s
            .find_objects(&[
                Attribute::Class(ObjectClass::SECRET_KEY),
                Attribute::Token(false),
                Attribute::Label(Vec::new()),
            ])
            .unwrap();
        assert!(
            copies.len() >= 2 * schemes.len(),
            "a master key and an HMAC key per scheme in use: {copies:?}"
        );
        for h in copies {
            for (t, want) in [
                (AttributeType::Private, true),
                (AttributeType::Sensitive, true),
                (AttributeType::Extractable, false),
                (AttributeType::Derive, false),
            ] {
                assert_eq!(bool_attr(&s, h, t), want, "session copy {t:?}");
            }
            let mechanisms = allowed(&s, h);
            assert_eq!(mechanisms.len(), 1, "{mechanisms:?}");
            assert!(
                s.get_attributes(h, &[AttributeType::Value])
                    .map(|a| a.is_empty())
                    .unwrap_or(true),
                "a session copy's value is readable"
            );
        }
    }

    /// The config's other ways in: the token by serial, the PIN from a file, and a label
    /// namespace of its own that keeps two prefixes' keys apart on one token.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn serial_pin_file_and_prefix_from_the_config() {
        use kesh::config::keystore::KeystoreConfig;
        let token = harness::tokens().shared.clone();
        let serial = {
            let (ctx, _s) = harness::raw_session(&token);
            let slot = device::find_slot(&ctx, &TokenSelector::Label(token.label.clone())).unwrap();
            ctx.get_token_info(slot)
                .unwrap()
                .serial_number()
                .trim()
                .to_owned()
        };
        let dir = tempfile::tempdir().unwrap();
        let pin_file = dir.path().join("pin");
        std::fs::write(&pin_file, format!("{}\n", token.pin().expose())).unwrap();
        let yaml = format!(
            "pkcs11:\n  module: {}\n  serial: \"{serial}\"\n  pin_file: {}\n  prefix: other-app/\n  profile: softhsm\n",
            token.module.display(),
            pin_file.display()
        );
        let KeystoreConfig::Pkcs11(cfg) =
            KeystoreConfig::from_value(&serde_yaml::from_str(&yaml).unwrap()).unwrap()
        else {
            panic!("not pkcs11")
        };
        assert_eq!(cfg.token, TokenSelector::Serial(serial));
        assert_eq!(
            cfg.pin.expose(),
            token.pin().expose(),
            "one trailing newline dropped"
        );
        let other = Pkcs11KeyStore::open(cfg).await.unwrap();
        let n = harness::name("prefixed");
        other.create(&n, harness::who()).await.unwrap();
        let (_ctx, s) = harness::raw_session(&token);
        assert_eq!(objects_labelled(&s, &format!("other-app/{n}")).len(), 2);
        // The default namespace does not see it, and may hold a key of the same name.
        let default = harness::pkcs11().await;
        assert_eq!(
            default.describe(&n).await.unwrap_err(),
            KeystoreError::KeyNotFound
        );
        default.create(&n, harness::who()).await.unwrap();
        other.describe(&n).await.unwrap();
    }

    /// SoftHSM uses the IV it is given, so with `iv: device` it would seal under the zeroed
    /// buffer kesh hands over: every seal must be refused instead of reusing that nonce.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn device_ivs_that_never_come_back_are_refused() {
        let store = harness::pkcs11_with(harness::tokens().shared.clone(), |c| {
            c.iv = Some(kesh::keystore::pkcs11::IvSource::Device)
        })
        .await;
        let n = harness::name("zero-iv");
        store.create(&n, harness::who()).await.unwrap();
        for _ in 0..2 {
            match store.generate(&n, b"ctx").await {
                Err(KeystoreError::Backend(why)) => {
                    assert!(why.to_string().contains("iv: caller"), "{why}")
                }
                other => panic!("a seal under an all-zero IV was not refused: {other:?}"),
            }
        }
        assert!(matches!(
            store.encrypt(&n, b"plain", b"").await,
            Err(KeystoreError::Backend(_))
        ));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn ciphertexts_cross_backends() {
        ciphertexts_cross(harness::pkcs11().await).await
    }

    async fn ciphertexts_cross(hsm: Store) {
        let soft = SoftKeyStore::in_memory();
        for scheme in [Scheme::Gcm, Scheme::Kwp, Scheme::Kes] {
            if scheme == Scheme::Kwp && !has_kwp(&hsm).await {
                continue;
            }
            let n = harness::name(&format!("cross-{scheme}"));
            let material: [u8; 32] = core::array::from_fn(|i| (i * 7) as u8);
            hsm.import(&n, import(material, scheme, HmacKeySource::None))
                .await
                .unwrap();
            soft.import(&n, import(material, scheme, HmacKeySource::None))
                .await
                .unwrap();
            let from_soft = soft.generate(&n, b"ctx").await.unwrap();
            assert_eq!(
                &hsm.decrypt(&n, &from_soft.ciphertext, b"ctx")
                    .await
                    .unwrap()[..],
                &from_soft.plaintext[..],
                "{scheme}: soft → pkcs11"
            );
            let from_hsm = hsm.generate(&n, b"ctx").await.unwrap();
            assert_eq!(
                &soft
                    .decrypt(&n, &from_hsm.ciphertext, b"ctx")
                    .await
                    .unwrap()[..],
                &from_hsm.plaintext[..],
                "{scheme}: pkcs11 → soft"
            );
            let big: Vec<u8> = (0..5000).map(|i| i as u8).collect();
            let ct = hsm.encrypt(&n, &big, b"").await.unwrap();
            assert_eq!(&soft.decrypt(&n, &ct, b"").await.unwrap()[..], &big[..]);
        }
    }

    /// A config with only module, token and PIN, what a user coming from KES writes, gets the
    /// profile of the module it loads: SoftHSM's session copies, pool size and host lock.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_profile_is_detected_from_the_module() {
        let token = harness::tokens().shared.clone();
        let bare = kesh::keystore::pkcs11::Pkcs11Config::new(
            token.module.clone(),
            TokenSelector::Label(token.label.clone()),
            token.pin().clone(),
            None,
        );
        let ks = Pkcs11KeyStore::open(bare.clone()).await.unwrap();
        let s = ks.settings();
        assert_eq!(s.profile.name, "softhsm");
        assert!(!s.profile_configured);
        assert_eq!((s.sessions, s.session_keys), (2, true));
        assert!(s.write_lock.is_some(), "the host write lock is on");
        // Explicit settings still win over the detected profile.
        let mut tuned = bare;
        tuned.sessions = Some(3);
        tuned.session_keys = Some(false);
        let ks = Pkcs11KeyStore::open(tuned).await.unwrap();
        assert_eq!(
            (ks.settings().sessions, ks.settings().session_keys),
            (3, false)
        );
        assert_eq!(ks.settings().profile.name, "softhsm");
    }

    /// The child half of the multi-process tests: does one action on a token named in the
    /// environment and prints its outcome. Does nothing in a normal run.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn child_process_action() {
        let Ok(action) = std::env::var("KESH_CHILD_ACTION") else {
            return;
        };
        let cfg = harness::config(&harness::child_token());
        // Other tests' processes may be writing to the token directory as this one starts;
        // SoftHSM then fails token reads for a moment. Opening is not what this test is about.
        let mut attempt = 0;
        let ks = loop {
            match Pkcs11KeyStore::open(cfg.clone()).await {
                Ok(ks) => break ks,
                Err(e) if attempt < 30 => {
                    attempt += 1;
                    eprintln!("open failed ({e}); retrying");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                }
                Err(e) => panic!("open: {e}"),
            }
        };
        let (verb, name) = action.split_once(':').unwrap();
        let name = KeyName::new(name).unwrap();
        // Start together: wait for the go-time the parent wrote.
        if let Ok(at) = std::env::var("KESH_CHILD_START_MS") {
            let at: u128 = at.parse().unwrap();
            while std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_millis()
                < at
            {
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
        }
        let outcome = match verb {
            "create" => ks.create(&name, harness::who()).await,
            "delete" => ks.delete(&name).await,
            "generate" => ks.generate(&name, b"").await.map(|_| ()),
            _ => panic!("unknown action {verb}"),
        };
        println!(
            "CHILD-OUTCOME {}",
            match outcome {
                Ok(()) => "ok".to_owned(),
                Err(e) => format!("{e:?}"),
            }
        );
    }

    fn spawn_child(
        token: &EphemeralToken,
        action: &str,
        start_ms: Option<u128>,
    ) -> std::process::Child {
        let mut cmd = Command::new(std::env::current_exe().unwrap());
        cmd.args([
            "keystore::pkcs11_only::child_process_action",
            "--exact",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("KESH_CHILD_ACTION", action)
        .env("KESH_CHILD_TOKEN", &token.label)
        .env("KESH_CHILD_PIN", token.pin().expose())
        .env("KESH_CHILD_MODULE", &token.module)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
        if let Some(ms) = start_ms {
            cmd.env("KESH_CHILD_START_MS", ms.to_string());
        }
        cmd.spawn().unwrap()
    }

    fn child_outcome(child: std::process::Child) -> String {
        let out = child.wait_with_output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        text.lines()
            .find_map(|l| l.split_once("CHILD-OUTCOME ").map(|(_, o)| o.to_owned()))
            .unwrap_or_else(|| {
                panic!(
                    "child printed no outcome: {text}\n{}",
                    String::from_utf8_lossy(&out.stderr)
                )
            })
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn two_processes_see_each_others_creates_and_deletes() {
        two_processes_share(harness::tokens().processes.clone()).await
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn create_race_across_processes_yields_one_key() {
        create_race_across_processes(harness::tokens().processes.clone()).await
    }

    /// SoftHSM locks its object files against other processes only: a token search on one
    /// thread while another created a key read the new object half-written, and the create
    /// failed with CKR_TEMPLATE_INCONSISTENT (a 502 in the scale-out run). Here searches for
    /// names that do not exist, each one a token search, run beside the creates.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn creates_beside_searches_in_one_process() {
        use std::sync::atomic::{AtomicBool, Ordering};
        let store = harness::pkcs11().await;
        let stop = Arc::new(AtomicBool::new(false));
        let searchers: Vec<_> = (0..3)
            .map(|t| {
                let (ks, stop) = (store.ks.clone(), stop.clone());
                tokio::spawn(async move {
                    let mut searches = 0u32;
                    while !stop.load(Ordering::Relaxed) {
                        let absent = harness::name(&format!("absent{t}x{searches}"));
                        match ks.describe(&absent).await {
                            Err(KeystoreError::KeyNotFound) => searches += 1,
                            other => panic!("describe of an absent key: {other:?}"),
                        }
                    }
                    searches
                })
            })
            .collect();
        for i in 0..80 {
            let n = harness::name(&format!("beside{i}"));
            if let Err(e) = store.ks.create(&n, harness::who()).await {
                stop.store(true, Ordering::Relaxed);
                panic!("create {i} beside searches: {e}");
            }
        }
        stop.store(true, Ordering::Relaxed);
        let mut searches = 0;
        for s in searchers {
            searches += s.await.unwrap();
        }
        // The searches ran beside the creates, not after them.
        assert!(searches >= 80, "only {searches} searches");
    }

    /// The same on Kryoptic; its store is an sqlite file the child processes share.
    mod kryoptic {
        use crate::harness;

        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn templates_hold_on_the_token() {
            super::templates_hold(harness::kryoptic().await).await
        }

        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn ciphertexts_cross_backends() {
            super::ciphertexts_cross(harness::kryoptic().await).await
        }

        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn two_processes_see_each_others_creates_and_deletes() {
            super::two_processes_share(harness::kryoptic_tokens().processes.clone()).await
        }

        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn create_race_across_processes_yields_one_key() {
            super::create_race_across_processes(harness::kryoptic_tokens().processes.clone()).await
        }
    }

    async fn two_processes_share(token: Arc<EphemeralToken>) {
        let store = harness::pkcs11_on(token.clone()).await;
        let (mine, theirs) = (harness::name("mine"), harness::name("theirs"));
        store.create(&mine, harness::who()).await.unwrap();
        let dk = store.generate(&mine, b"c").await.unwrap();
        // The other process creates a key: usable here at once (an index miss searches the token).
        assert_eq!(
            child_outcome(spawn_child(&token, &format!("create:{theirs}"), None)),
            "ok"
        );
        store.describe(&theirs).await.unwrap();
        // Listings come from the index, which the change-marker poll rescans; a rescan now
        // shows the other process's key.
        store
            .pkcs11
            .as_ref()
            .unwrap()
            .0
            .rebuild_index()
            .await
            .unwrap();
        assert!(store.list("").await.unwrap().contains(&theirs));
        // It can use ours, and deletes it. Seals and unseals here may go through a session copy
        // of the key (softhsm profile) and notice within `copies::RECHECK`; describe reads the
        // token object and notices at once.
        assert_eq!(
            child_outcome(spawn_child(&token, &format!("generate:{mine}"), None)),
            "ok"
        );
        let deleted = std::time::Instant::now();
        assert_eq!(
            child_outcome(spawn_child(&token, &format!("delete:{mine}"), None)),
            "ok"
        );
        let bound = copies::RECHECK + std::time::Duration::from_millis(500);
        loop {
            match store.decrypt(&mine, &dk.ciphertext, b"c").await {
                Err(e) => {
                    assert_eq!(e, KeystoreError::KeyNotFound);
                    break;
                }
                Ok(_) => assert!(
                    deleted.elapsed() < bound,
                    "a key deleted by another process still decrypts after {bound:?}"
                ),
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        assert_eq!(
            store.describe(&mine).await.unwrap_err(),
            KeystoreError::KeyNotFound
        );
        // With copies off, crypto operations notice the delete at once, like describe.
        let other = harness::name("other");
        let plain = harness::pkcs11_with(token.clone(), |c| c.session_keys = Some(false)).await;
        plain.create(&other, harness::who()).await.unwrap();
        let dk = plain.generate(&other, b"c").await.unwrap();
        assert_eq!(
            child_outcome(spawn_child(&token, &format!("delete:{other}"), None)),
            "ok"
        );
        assert_eq!(
            plain
                .decrypt(&other, &dk.ciphertext, b"c")
                .await
                .unwrap_err(),
            KeystoreError::KeyNotFound
        );
        assert_eq!(
            child_outcome(spawn_child(&token, &format!("create:{theirs}"), None)),
            "KeyExists"
        );
        // And the other way round: our delete is the other process's 404.
        store.delete(&theirs).await.unwrap();
        assert_eq!(
            child_outcome(spawn_child(&token, &format!("generate:{theirs}"), None)),
            "KeyNotFound"
        );
    }

    async fn create_race_across_processes(token: Arc<EphemeralToken>) {
        let store = harness::pkcs11_on(token.clone()).await;
        for round in 0..3 {
            let n = harness::name(&format!("xrace{round}"));
            // Children need ~a second to start; all go at the same wall-clock instant.
            let start = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_millis()
                + 1500;
            let children: Vec<_> = (0..3)
                .map(|_| spawn_child(&token, &format!("create:{n}"), Some(start)))
                .collect();
            let outcomes: Vec<String> = children.into_iter().map(child_outcome).collect();
            let wins = outcomes.iter().filter(|o| *o == "ok").count();
            assert_eq!(wins, 1, "round {round}: {outcomes:?}");
            assert!(
                outcomes.iter().all(|o| o == "ok" || o == "KeyExists"),
                "{outcomes:?}"
            );
            // Exactly one master and one HMAC object remain under the label.
            let (_ctx, s) = harness::raw_session(&token);
            assert_eq!(
                objects_labelled(&s, &format!("kesh/{n}")).len(),
                2,
                "round {round}"
            );
            store.describe(&n).await.unwrap();
        }
    }

    /// The child half of the PIN test: logs everything at TRACE to stderr while opening the
    /// token with a wrong PIN and the right one, and prints every value a PIN could leak into.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn child_pin_logging() {
        if std::env::var("KESH_CHILD_PIN_LOGGING").is_err() {
            return;
        }
        tracing_subscriber::fmt()
            .with_max_level(tracing::Level::TRACE)
            .with_writer(std::io::stderr)
            .init();
        let cfg = harness::child_token().config();
        let wrong = kesh::keystore::pkcs11::Pkcs11Config {
            pin: kesh::secret::Pin::new(format!("{}0", cfg.pin.expose())),
            ..cfg.clone()
        };
        println!("wrong config: {wrong:?}");
        let err = Pkcs11KeyStore::open(wrong).await.unwrap_err();
        println!("wrong PIN error: {err} / {err:?}");
        tracing::error!(error = %err, "open failed");
        println!("config: {cfg:?}");
        let ks = Pkcs11KeyStore::open(cfg).await.unwrap();
        println!("keystore: {ks:?}");
        let n = harness::name("pin");
        ks.create(&n, harness::who()).await.unwrap();
        let dk = ks.generate(&n, b"").await.unwrap();
        println!("data key: {dk:?}");
        println!("CHILD-OUTCOME ok");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn pin_never_reaches_logs_errors_or_debug() {
        let token = harness::tokens().processes.clone();
        let pin = token.pin().expose().to_owned();
        let out = Command::new(std::env::current_exe().unwrap())
            .args([
                "keystore::pkcs11_only::child_pin_logging",
                "--exact",
                "--nocapture",
                "--test-threads=1",
            ])
            .env("KESH_CHILD_PIN_LOGGING", "1")
            .env("KESH_CHILD_TOKEN", &token.label)
            .env("KESH_CHILD_PIN", &pin)
            .output()
            .unwrap();
        let (stdout, stderr) = (
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
        );
        assert!(
            stdout.contains("CHILD-OUTCOME ok"),
            "child failed:\n{stdout}\n{stderr}"
        );
        // The output is real: the wrong PIN was reported and the keystore logged its start.
        assert!(stdout.contains("refused the PIN"), "{stdout}");
        assert!(stderr.contains("pkcs11 keystore ready"), "{stderr}");
        assert!(
            !stdout.contains(&pin) && !stderr.contains(&pin),
            "the PIN leaked:\n{stdout}\n{stderr}"
        );
    }

    /// 10,000 keys on one token: the index is built in one scan, and lookups don't search.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn ten_thousand_keys() {
        let token = harness::tokens().bulk.clone();
        let started = Instant::now();
        harness::write_ready_keys(&token, (0..10_000).map(|i| format!("bulk-{i}")));
        let populate = started.elapsed();
        let started = Instant::now();
        let ks = Pkcs11KeyStore::open(token.config()).await.unwrap();
        let open = started.elapsed();
        assert_eq!(ks.indexed_keys(), 10_000);
        let rebuild = ks.rebuild_index().await.unwrap();
        let searches = ks.token_searches();
        let started = Instant::now();
        for i in (0..10_000).step_by(50) {
            let n = KeyName::new(&format!("bulk-{i}")).unwrap();
            let dk = ks.generate(&n, b"c").await.unwrap();
            assert_eq!(
                &ks.decrypt(&n, &dk.ciphertext, b"c").await.unwrap()[..],
                &dk.plaintext[..]
            );
        }
        let per_pair = started.elapsed() / 200;
        // Lookups stay fast because no request searches the token (a SoftHSM search walks
        // all 20,000 objects): they are answered from the index.
        assert_eq!(ks.token_searches(), searches, "requests searched the token");
        let unknown = KeyName::new("bulk-none").unwrap();
        assert_eq!(
            ks.generate(&unknown, b"c").await.unwrap_err(),
            KeystoreError::KeyNotFound
        );
        assert_eq!(ks.token_searches(), searches + 1, "a miss searches once");
        assert_eq!(ks.list("bulk-").await.unwrap().len(), 10_000);
        harness::report(&format!(
            "10k keys: populate {populate:?}, open+index {open:?}, index rebuild {rebuild:?}, generate+decrypt {per_pair:?} per pair"
        ));
    }
}

/// Every `.yaml` file under `hsm-config/` (profiles included) parses and validates: a whole
/// config (one with `admin:`, `tls:` or `address:`) through the server config parser, a
/// keystore section through the keystore parser. A profile file must name its own profile.
#[test]
fn hsm_config_files_validate() {
    use kesh::config::keystore::KeystoreConfig;
    use kesh::config::server::ServerConfig;

    fn yaml_files(dir: &std::path::Path, out: &mut Vec<std::path::PathBuf>) {
        for entry in std::fs::read_dir(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
            let path = entry.unwrap().path();
            if path.is_dir() {
                yaml_files(&path, out);
            } else if path.extension().and_then(|e| e.to_str()) == Some("yaml") {
                out.push(path);
            }
        }
    }
    // Identities become distinct hex hashes (policies may not share one); anything else a
    // placeholder string.
    fn lookup(name: &str) -> Option<String> {
        if name.contains("IDENTITY") || name.contains("ADMIN") {
            let hex: String = name.bytes().map(|b| format!("{b:02x}")).collect();
            Some(format!("{hex:0<64}")[..64].to_owned())
        } else {
            Some("placeholder".into())
        }
    }

    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("hsm-config");
    let mut files = Vec::new();
    yaml_files(&dir, &mut files);
    files.sort();
    let (mut whole, mut sections) = (0, 0);
    for path in &files {
        let text = std::fs::read_to_string(path).unwrap();
        let value = kesh::config::env::substitute_with(&text, lookup)
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let is_whole = ["admin", "tls", "address"]
            .iter()
            .any(|k| value.get(k).is_some());
        let keystore = if is_whole {
            whole += 1;
            ServerConfig::parse_with(&text, lookup)
                .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
                .keystore
        } else {
            sections += 1;
            let section = value
                .get("keystore")
                .unwrap_or_else(|| panic!("{}: no `keystore:` section", path.display()));
            KeystoreConfig::from_value(section)
                .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        };
        if path.parent().and_then(|p| p.file_name()) == Some("profiles".as_ref()) {
            let stem = path.file_stem().and_then(|s| s.to_str()).unwrap();
            let KeystoreConfig::Pkcs11(cfg) = keystore else {
                panic!("{}: a profile must configure `pkcs11:`", path.display())
            };
            assert_eq!(
                cfg.profile.map(|p| p.name),
                Some(stem),
                "{}: profile file names another profile",
                path.display()
            );
        }
        println!("validated {}", path.display());
    }
    assert!(
        whole > 0 && sections >= 6,
        "expected the reference config and a profile per HSM family in {}, found {whole} whole configs and {sections} keystore sections",
        dir.display()
    );
}
