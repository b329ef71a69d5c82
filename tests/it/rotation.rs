//! Key versions and rotation (docs/FORMAT.md §8, docs/minio.md "Rotating keys"): on every
//! keystore, across two instances of one keystore, through the API (policy, errors, routes),
//! the CLI, and the schedule across two `kesh server` processes.

use std::time::Duration;

use kesh::crypto::kes::{self, Algorithm};
use kesh::keystore::{
    HmacKeySource, ImportKey, KeystoreError, ScheduledRotation, Scheme, VersionState,
    REFUSE_FIRST, REFUSE_SEALING, SEALING_GRACE,
};
use kesh::name::KeyName;
use zeroize::Zeroizing;

use crate::cli::Server;
use crate::harness::{self, Store};

crate::on_every_keystore!(
    every_version_decrypts_after_rotations,
    destroyed_version_is_not_authentic,
    concurrent_rotations_make_distinct_versions,
    scheduled_rotation_is_compare_and_rotate,
    kes_scheme_keeps_kes_ciphertexts_as_version_one,
    missing_keys_and_versions,
);

/// The key version a ciphertext names (FORMAT.md §8): the envelope's, else 1.
fn version_of(ct: &[u8]) -> u32 {
    kesh::crypto::versioned::split(ct).map_or(1, |(v, _)| v)
}

/// A second instance of the same keystore (same token), when the backend has one: the
/// in-memory soft keystore has none (the directory store is tested below).
async fn second(ks: &Store) -> Option<Store> {
    match &ks.pkcs11 {
        Some((_, token)) => Some(harness::pkcs11_on(token.clone()).await),
        None => None,
    }
}

async fn every_version_decrypts_after_rotations(ks: Store) {
    let n = harness::name("rot");
    ks.create(&n, harness::who()).await.unwrap();
    // Opened before the rotations: it learns of them from the token, not from its start-up scan.
    let other = second(&ks).await;
    assert_eq!(ks.describe(&n).await.unwrap().version, 1);
    let ctx = b"bucket/object";
    let mut deks = vec![ks.generate(&n, ctx).await.unwrap()];
    assert_eq!(deks[0].ciphertext.len(), 63, "version 1 keeps its format");
    for expected in 2..=4u32 {
        assert_eq!(ks.rotate(&n, harness::who()).await.unwrap(), expected);
        assert_eq!(ks.describe(&n).await.unwrap().version, expected);
        let dk = ks.generate(&n, ctx).await.unwrap();
        assert_eq!(version_of(&dk.ciphertext), expected);
        assert_eq!(dk.ciphertext.len(), 69, "6-byte envelope + the version-1 format");
        assert_eq!(&dk.ciphertext[..2], b"k\x02");
        assert_eq!(&dk.ciphertext[6..9], b"k\x01\x01");
        deks.push(dk);
    }
    let enc = ks.encrypt(&n, b"hello", ctx).await.unwrap();
    assert_eq!(version_of(&enc), 4);
    for (i, dk) in deks.iter().enumerate() {
        let pt = ks.decrypt(&n, &dk.ciphertext, ctx).await.unwrap();
        assert_eq!(&pt[..], &dk.plaintext[..], "version {}", i + 1);
        assert_eq!(
            ks.decrypt(&n, &dk.ciphertext, b"other").await,
            Err(KeystoreError::NotAuthentic)
        );
    }
    // A ciphertext moved to another version's envelope does not open.
    let mut moved = deks[1].ciphertext.clone();
    moved[5] = 3;
    assert_eq!(
        ks.decrypt(&n, &moved, ctx).await,
        Err(KeystoreError::NotAuthentic)
    );

    let versions = ks.versions(&n).await.unwrap();
    assert_eq!(
        versions.iter().map(|v| v.version).collect::<Vec<_>>(),
        vec![1, 2, 3, 4]
    );
    assert_eq!(versions[3].state, VersionState::Sealing);
    assert!(versions[..3].iter().all(|v| v.state == VersionState::Active));
    // Seals: one generate per version, plus the encrypt under 4; unseals: one each.
    assert_eq!(
        versions.iter().map(|v| (v.seals, v.unseals)).collect::<Vec<_>>(),
        vec![(1, 1), (1, 1), (1, 1), (2, 1)]
    );
    assert!(versions.iter().all(|v| v.last_used.is_some()));
    let usage = ks.version_usage();
    assert!(usage
        .iter()
        .any(|u| u.key == n && u.version == 4 && u.seals == 2));

    if let Some(other) = other {
        // The other instance decrypts every version at once (a targeted lookup for versions
        // it has not seen) ...
        for dk in &deks {
            let pt = other.decrypt(&n, &dk.ciphertext, ctx).await.unwrap();
            assert_eq!(&pt[..], &dk.plaintext[..]);
        }
        // ... and seals with the newest.
        let dk = other.generate(&n, ctx).await.unwrap();
        assert_eq!(version_of(&dk.ciphertext), 4);
        // A rotation there reaches this instance: decrypt at once, seal within the poll.
        assert_eq!(other.rotate(&n, harness::who()).await.unwrap(), 5);
        let dk5 = other.generate(&n, ctx).await.unwrap();
        assert_eq!(
            &ks.decrypt(&n, &dk5.ciphertext, ctx).await.unwrap()[..],
            &dk5.plaintext[..]
        );
        let start = std::time::Instant::now();
        loop {
            let dk = ks.generate(&n, ctx).await.unwrap();
            if version_of(&dk.ciphertext) == 5 {
                break;
            }
            assert!(
                start.elapsed() < Duration::from_secs(2),
                "this instance still seals with version {} after {:?}",
                version_of(&dk.ciphertext),
                start.elapsed()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        harness::report(&format!(
            "rotation: {} seals with a version made on another instance after {:?}",
            ks.backend.name(),
            start.elapsed()
        ));
    }
    // Deleting the key deletes every version.
    ks.delete(&n).await.unwrap();
    assert_eq!(ks.versions(&n).await, Err(KeystoreError::KeyNotFound));
    ks.create(&n, harness::who()).await.unwrap();
    assert_eq!(ks.describe(&n).await.unwrap().version, 1);
    assert_eq!(ks.versions(&n).await.unwrap().len(), 1);
    assert_eq!(
        ks.decrypt(&n, &deks[3].ciphertext, ctx).await,
        Err(KeystoreError::NotAuthentic)
    );
}

async fn destroyed_version_is_not_authentic(ks: Store) {
    let n = harness::name("destroy");
    ks.create(&n, harness::who()).await.unwrap();
    let v1 = ks.generate(&n, b"c").await.unwrap();
    ks.rotate(&n, harness::who()).await.unwrap();
    let v2 = ks.generate(&n, b"c").await.unwrap();
    // The sealing version, and version 1, stay.
    assert_eq!(
        ks.destroy_version(&n, 2).await,
        Err(KeystoreError::VersionRefused(REFUSE_SEALING))
    );
    assert_eq!(
        ks.destroy_version(&n, 1).await,
        Err(KeystoreError::VersionRefused(REFUSE_FIRST))
    );
    ks.rotate(&n, harness::who()).await.unwrap();
    let v3 = ks.generate(&n, b"c").await.unwrap();
    // Version 2 may still seal on instances that have not seen version 3 yet.
    assert_eq!(
        ks.destroy_version(&n, 2).await,
        Err(KeystoreError::VersionRefused(REFUSE_SEALING))
    );
    tokio::time::sleep(SEALING_GRACE).await;
    ks.destroy_version(&n, 2).await.unwrap();
    assert_eq!(
        ks.decrypt(&n, &v2.ciphertext, b"c").await,
        Err(KeystoreError::NotAuthentic)
    );
    for dk in [&v1, &v3] {
        assert_eq!(
            &ks.decrypt(&n, &dk.ciphertext, b"c").await.unwrap()[..],
            &dk.plaintext[..]
        );
    }
    assert_eq!(
        ks.versions(&n)
            .await
            .unwrap()
            .iter()
            .map(|v| v.version)
            .collect::<Vec<_>>(),
        vec![1, 3]
    );
    assert_eq!(
        ks.destroy_version(&n, 2).await,
        Err(KeystoreError::VersionNotFound)
    );
    assert_eq!(
        ks.destroy_version(&n, 9).await,
        Err(KeystoreError::VersionNotFound)
    );
    // Numbers are never reused: the next rotation makes 4.
    assert_eq!(ks.rotate(&n, harness::who()).await.unwrap(), 4);
    if let Some(other) = second(&ks).await {
        assert_eq!(
            other.decrypt(&n, &v2.ciphertext, b"c").await,
            Err(KeystoreError::NotAuthentic)
        );
    }
}

async fn concurrent_rotations_make_distinct_versions(ks: Store) {
    let n = harness::name("race");
    ks.create(&n, harness::who()).await.unwrap();
    let other = second(&ks).await;
    let mut tasks = Vec::new();
    for i in 0..6 {
        let store = match (&other, i % 2) {
            (Some(o), 1) => o.ks.clone(),
            _ => ks.ks.clone(),
        };
        let n = n.clone();
        tasks.push(tokio::spawn(async move {
            store.rotate(&n, harness::who()).await
        }));
    }
    let mut made = Vec::new();
    for t in tasks {
        made.push(t.await.unwrap().unwrap());
    }
    made.sort_unstable();
    assert_eq!(made, vec![2, 3, 4, 5, 6, 7], "one version per rotation");
    let listed: Vec<u32> = ks
        .versions(&n)
        .await
        .unwrap()
        .iter()
        .map(|v| v.version)
        .collect();
    // This instance may learn of the other's last versions a poll later.
    assert!(listed.starts_with(&[1, 2]), "{listed:?}");
    let fresh = match &ks.pkcs11 {
        Some((_, token)) => harness::pkcs11_on(token.clone()).await,
        None => return assert_eq!(listed, vec![1, 2, 3, 4, 5, 6, 7]),
    };
    assert_eq!(
        fresh
            .versions(&n)
            .await
            .unwrap()
            .iter()
            .map(|v| v.version)
            .collect::<Vec<_>>(),
        vec![1, 2, 3, 4, 5, 6, 7]
    );
}

async fn scheduled_rotation_is_compare_and_rotate(ks: Store) {
    let n = harness::name("sched");
    let hour = Duration::from_secs(3600);
    let short = Duration::from_millis(300);
    assert_eq!(
        ks.rotate_if_due(&n, hour, harness::who()).await,
        Err(KeystoreError::KeyNotFound)
    );
    ks.create(&n, harness::who()).await.unwrap();
    assert_eq!(
        ks.rotate_if_due(&n, hour, harness::who()).await.unwrap(),
        ScheduledRotation::NotDue
    );
    tokio::time::sleep(short).await;
    // Due: of several concurrent checks (two instances on a token), exactly one rotates.
    let other = second(&ks).await;
    let mut tasks = Vec::new();
    for i in 0..4 {
        let store = match (&other, i % 2) {
            (Some(o), 1) => o.ks.clone(),
            _ => ks.ks.clone(),
        };
        let n = n.clone();
        tasks.push(tokio::spawn(async move {
            store.rotate_if_due(&n, short, harness::who()).await
        }));
    }
    let mut outcomes = Vec::new();
    for t in tasks {
        outcomes.push(t.await.unwrap().unwrap());
    }
    assert_eq!(
        outcomes
            .iter()
            .filter(|o| **o == ScheduledRotation::Rotated(2))
            .count(),
        1,
        "{outcomes:?}"
    );
    assert!(outcomes
        .iter()
        .all(|o| matches!(o, ScheduledRotation::Rotated(2) | ScheduledRotation::NotDue)));
    // The new version restarts the period.
    assert_eq!(
        ks.rotate_if_due(&n, short, harness::who()).await.unwrap(),
        ScheduledRotation::NotDue
    );
    tokio::time::sleep(short).await;
    assert_eq!(
        ks.rotate_if_due(&n, short, harness::who()).await.unwrap(),
        ScheduledRotation::Rotated(3)
    );
}

/// Imported keys use the `kes` scheme: KES's ciphertexts (version 1) keep decrypting after a
/// rotation, even one that happens to begin like a version envelope.
async fn kes_scheme_keeps_kes_ciphertexts_as_version_one(ks: Store) {
    let n = harness::name("kesrot");
    let master = [0x42u8; 32];
    ks.import(
        &n,
        ImportKey {
            key: Zeroizing::new(master),
            algorithm: Algorithm::Aes256,
            scheme: Scheme::Kes,
            hmac: HmacKeySource::Generate,
            provenance: harness::who(),
        },
    )
    .await
    .unwrap();
    let mac = ks.hmac(&n, b"m").await.unwrap();
    let ctx = b"ctx";
    // A KES ciphertext made outside kesh (as KES would) whose first bytes read 'k' 0x02:
    // searched for by IV.
    let kes_ct = (0u64..)
        .find_map(|i| {
            let mut iv = [0u8; kes::IV_LEN];
            iv[..8].copy_from_slice(&i.to_be_bytes());
            let derived = kes::derive_soft(Algorithm::Aes256, &master, &iv);
            let ct = kes::seal(Algorithm::Aes256, &derived, &iv, &[7; 12], b"old", ctx);
            ct.starts_with(b"k\x02").then_some(ct)
        })
        .unwrap();
    assert!(kesh::crypto::versioned::split(&kes_ct).is_some());
    ks.rotate(&n, harness::who()).await.unwrap();
    let new = ks.encrypt(&n, b"new", ctx).await.unwrap();
    assert_eq!(version_of(&new), 2);
    assert_eq!(&ks.decrypt(&n, &kes_ct, ctx).await.unwrap()[..], b"old");
    assert_eq!(&ks.decrypt(&n, &new, ctx).await.unwrap()[..], b"new");
    // The HMAC key is the key's, not a version's: it survives rotation.
    assert_eq!(ks.hmac(&n, b"m").await.unwrap(), mac);
}

async fn missing_keys_and_versions(ks: Store) {
    let n = KeyName::new(&format!("{}-none", harness::name("missing"))).unwrap();
    assert_eq!(
        ks.rotate(&n, harness::who()).await,
        Err(KeystoreError::KeyNotFound)
    );
    assert_eq!(ks.versions(&n).await, Err(KeystoreError::KeyNotFound));
    assert_eq!(
        ks.destroy_version(&n, 2).await,
        Err(KeystoreError::KeyNotFound)
    );
}

mod soft_dir {
    //! Two soft keystores on one directory: the files are the truth, for versions too.

    use super::*;
    use kesh::keystore::soft::SoftKeyStore;
    use kesh::keystore::KeyStore;

    fn two_stores() -> (tempfile::TempDir, SoftKeyStore, SoftKeyStore) {
        let root = tempfile::tempdir().unwrap();
        let kek = root.path().join("kek");
        harness::write_private(&kek, hex::encode([9u8; 32]));
        let dir = root.path().join("keys");
        let a = SoftKeyStore::open_dir(&dir, &kek).unwrap();
        let b = SoftKeyStore::open_dir(&dir, &kek).unwrap();
        (root, a, b)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn versions_follow_the_directory_across_processes() {
        let (root, a, b) = two_stores();
        let n = harness::name("dirrot");
        a.create(&n, harness::who()).await.unwrap();
        let d1 = b.generate(&n, b"c").await.unwrap();
        assert_eq!(a.rotate(&n, harness::who()).await.unwrap(), 2);
        // The other store seals with version 2 at its next request (one stat per use) ...
        let d2 = b.generate(&n, b"c").await.unwrap();
        assert_eq!(version_of(&d2.ciphertext), 2);
        assert_eq!(b.rotate(&n, harness::who()).await.unwrap(), 3);
        let d3 = a.generate(&n, b"c").await.unwrap();
        assert_eq!(version_of(&d3.ciphertext), 3);
        for dk in [&d1, &d2, &d3] {
            for s in [&a, &b] {
                assert_eq!(
                    &s.decrypt(&n, &dk.ciphertext, b"c").await.unwrap()[..],
                    &dk.plaintext[..]
                );
            }
        }
        // Version files are not keys.
        assert_eq!(a.list("").await.unwrap(), vec![n.clone()]);
        assert!(root.path().join(format!("keys/{n}.v2")).exists());
        // ... and a version destroyed by one is gone for the other.
        tokio::time::sleep(SEALING_GRACE).await;
        a.destroy_version(&n, 2).await.unwrap();
        assert_eq!(
            b.decrypt(&n, &d2.ciphertext, b"c").await,
            Err(KeystoreError::NotAuthentic)
        );
        // A fresh open reads the same versions.
        let c = SoftKeyStore::open_dir(&root.path().join("keys"), &root.path().join("kek"))
            .unwrap();
        assert_eq!(c.describe(&n).await.unwrap().version, 3);
        assert_eq!(
            &c.decrypt(&n, &d3.ciphertext, b"c").await.unwrap()[..],
            &d3.plaintext[..]
        );
        // Delete removes every version's file; a new key of the name starts at 1.
        b.delete(&n).await.unwrap();
        assert!(!root.path().join(format!("keys/{n}.v3")).exists());
        a.create(&n, harness::who()).await.unwrap();
        assert_eq!(b.describe(&n).await.unwrap().version, 1);
        assert_eq!(
            b.decrypt(&n, &d3.ciphertext, b"c").await,
            Err(KeystoreError::NotAuthentic)
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_version_file_of_a_deleted_key_is_not_adopted() {
        let (root, a, _b) = two_stores();
        let n = harness::name("orphan");
        a.create(&n, harness::who()).await.unwrap();
        a.rotate(&n, harness::who()).await.unwrap();
        let keys = root.path().join("keys");
        let saved = std::fs::read(keys.join(format!("{n}.v2"))).unwrap();
        a.delete(&n).await.unwrap();
        a.create(&n, harness::who()).await.unwrap();
        // What an interrupted delete leaves: the old key's version file.
        std::fs::write(keys.join(format!("{n}.v2")), saved).unwrap();
        let fresh = SoftKeyStore::open_dir(&keys, &root.path().join("kek")).unwrap();
        assert_eq!(fresh.describe(&n).await.unwrap().version, 1);
        assert_eq!(fresh.rotate(&n, harness::who()).await.unwrap(), 2);
    }
}
