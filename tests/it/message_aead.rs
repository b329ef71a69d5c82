//! PKCS#11 3.0 message-based AEAD: on a module that offers it (Kryoptic), a `gcm` seal and an
//! unseal are one device call each once a session is prepared for the key; on a 2.40 module
//! (SoftHSM), or with `message_aead: false`, kesh keeps the two-call path; the ciphertexts are
//! the same either way.

use std::sync::Arc;

use kesh::keystore::KeystoreError;

use crate::harness;

const N: u64 = 200;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_kryoptic_a_generate_and_a_decrypt_are_one_message_call_each() {
    let store = harness::kryoptic().await;
    let ks = &store.pkcs11.as_ref().unwrap().0;
    let name = harness::name("one-call");
    store.create(&name, harness::who()).await.unwrap();
    let dk = store.generate(&name, b"ctx").await.unwrap();
    let before = ks
        .message_calls()
        .expect("Kryoptic offers message-based AES-GCM");
    let mut keys = Vec::new();
    for _ in 0..N {
        keys.push(store.generate(&name, b"ctx").await.unwrap());
    }
    for k in &keys {
        let pt = store.decrypt(&name, &k.ciphertext, b"ctx").await.unwrap();
        assert_eq!(&pt[..], &k.plaintext[..]);
    }
    let after = ks.message_calls().unwrap();
    let (prepares, messages, finals) = (after.0 - before.0, after.1 - before.1, after.2 - before.2);
    assert_eq!(
        messages,
        2 * N,
        "one C_EncryptMessage / C_DecryptMessage per operation"
    );
    // Each session prepares once per direction, and again each time its operation is a
    // second old (a delete elsewhere must show): a few, not one per operation.
    let sessions = ks.settings().sessions as u64;
    assert!(
        prepares <= 2 * sessions * 4,
        "{prepares} prepares for {} operations",
        2 * N
    );
    assert!(finals <= prepares);
    harness::report(&format!(
        "calls: on Kryoptic {} generates and decrypts made {messages} message calls, {prepares} prepares, {finals} finals",
        2 * N
    ));

    // A wrong context is "not authentic", and the session stays usable.
    assert_eq!(
        store
            .decrypt(&name, &dk.ciphertext, b"other")
            .await
            .unwrap_err(),
        KeystoreError::NotAuthentic
    );
    let pt = store.decrypt(&name, &dk.ciphertext, b"ctx").await.unwrap();
    assert_eq!(&pt[..], &dk.plaintext[..]);
}

/// The same count taken outside kesh: a `kesh server` loads Kryoptic through the fault shim,
/// which forwards its v3.0 interface and counts every call that reaches the module.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn through_the_shim_kryoptic_receives_one_call_per_generate_and_per_decrypt() {
    let token = harness::kryoptic_tokens().processes.clone();
    let srv = harness::server()
        .pkcs11(&token)
        .fault_shim("")
        .env("KESH_SHIM_TARGET", &token.module.display().to_string())
        .spawn();
    let c = srv.client();
    let name = harness::name("shim-count").to_string();
    c.create_key(&name).await.unwrap();
    // Prepares each pool session for the key once, outside the count.
    for _ in 0..8 {
        c.generate_key(&name, b"ctx").await.unwrap();
    }
    let before = srv.all_calls().await;
    let mut keys = Vec::new();
    for _ in 0..N {
        keys.push(c.generate_key(&name, b"ctx").await.unwrap());
    }
    for dk in &keys {
        let pt = c.decrypt(&name, &dk.ciphertext.0, b"ctx").await.unwrap();
        assert_eq!(pt.0[..], dk.plaintext.0[..]);
    }
    let made: std::collections::BTreeMap<_, _> = srv
        .all_calls()
        .await
        .into_iter()
        .map(|(f, n)| {
            let was = before.get(&f).copied().unwrap_or(0);
            (f, n - was)
        })
        .filter(|(_, n)| *n > 0)
        .collect();
    assert_eq!(made.get("C_EncryptMessage"), Some(&N), "{made:?}");
    assert_eq!(made.get("C_DecryptMessage"), Some(&N), "{made:?}");
    // Nothing else runs once per operation: beside the message calls only randomness
    // refills, prepares and the change poll's reads, each far fewer than N in all.
    for (f, n) in &made {
        assert!(
            matches!(f.as_str(), "C_EncryptMessage" | "C_DecryptMessage") || *n < N / 2,
            "{f} ran {n} times for {N} generates and {N} decrypts: {made:?}"
        );
    }
    let total: u64 = made.values().sum();
    harness::report(&format!(
        "calls: through the shim, Kryoptic received {total} calls for {} generates and decrypts ({:.2} per operation)",
        2 * N,
        total as f64 / (2 * N) as f64
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn message_aead_false_and_a_2_40_module_seal_in_two_calls_with_the_same_ciphertexts() {
    let token = harness::kryoptic_tokens().shared.clone();
    let message = harness::pkcs11_on(token.clone()).await;
    let classic = harness::pkcs11_with(token, |cfg| cfg.message_aead = Some(false)).await;
    assert!(classic.pkcs11.as_ref().unwrap().0.message_calls().is_none());
    let softhsm = harness::pkcs11().await;
    assert!(softhsm.pkcs11.as_ref().unwrap().0.message_calls().is_none());

    // Both paths open each other's ciphertexts, on one token.
    let name = harness::name("two-paths");
    message.create(&name, harness::who()).await.unwrap();
    let stores: [Arc<dyn kesh::keystore::KeyStore>; 2] = [message.ks.clone(), classic.ks.clone()];
    for (sealer, opener) in [(0, 1), (1, 0)] {
        let dk = stores[sealer].generate(&name, b"ctx").await.unwrap();
        let pt = stores[opener]
            .decrypt(&name, &dk.ciphertext, b"ctx")
            .await
            .unwrap();
        assert_eq!(&pt[..], &dk.plaintext[..]);
        assert_eq!(
            stores[opener]
                .decrypt(&name, &dk.ciphertext, b"ctx2")
                .await
                .unwrap_err(),
            KeystoreError::NotAuthentic
        );
    }
}
