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
