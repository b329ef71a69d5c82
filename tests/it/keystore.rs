//! The KeyStore suite: every operation, run once on the soft keystore and once on SoftHSM.

use kesh::keystore::KeystoreError;

use crate::harness::{self, Store};

crate::on_both_keystores!(smoke);

async fn smoke(ks: Store) {
    let n = harness::name("smoke");
    ks.create(&n, harness::who()).await.unwrap();
    let dk = ks.generate(&n, b"ctx").await.unwrap();
    assert_eq!(&ks.decrypt(&n, &dk.ciphertext, b"ctx").await.unwrap()[..], &dk.plaintext[..]);
    assert_eq!(ks.decrypt(&n, &dk.ciphertext, b"xxx").await.unwrap_err(), KeystoreError::NotAuthentic);
}
