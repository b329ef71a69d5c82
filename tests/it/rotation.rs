//! Key versions and rotation (docs/FORMAT.md §8, docs/minio.md "Rotating keys"): on every
//! keystore, across two instances of one keystore, through the API (policy, errors, routes),
//! the CLI, and the schedule across two `kesh server` processes.

use std::time::Duration;

use kesh::crypto::kes::{self, Algorithm};
use kesh::keystore::{
    HmacKeySource, ImportKey, KeystoreError, ScheduledRotation, Scheme, VersionState, REFUSE_FIRST,
    REFUSE_SEALING, SEALING_GRACE,
};
use kesh::name::KeyName;
use zeroize::Zeroizing;

use crate::harness::{self, server, Store};
use kesh::identity::ApiKey;

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
        assert_eq!(
            dk.ciphertext.len(),
            69,
            "6-byte envelope + the version-1 format"
        );
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
    assert!(versions[..3]
        .iter()
        .all(|v| v.state == VersionState::Active));
    // Seals: one generate per version, plus the encrypt under 4; unseals: one each.
    assert_eq!(
        versions
            .iter()
            .map(|v| (v.seals, v.unseals))
            .collect::<Vec<_>>(),
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
        // A rotation there reaches this instance: it seals with it once the change-marker
        // poll has seen it (no request here names the new version first), and decrypts it at
        // once. About a second on a quiet token (docs/api.md). The bound is wider: the suite's
        // other tests change this token meanwhile, each change is a rescan here, and a rescan
        // that took t waits t before the next (slow with Kryoptic's debug build under load).
        assert_eq!(other.rotate(&n, harness::who()).await.unwrap(), 5);
        let dk5 = other.generate(&n, ctx).await.unwrap();
        let start = std::time::Instant::now();
        loop {
            let dk = ks.generate(&n, ctx).await.unwrap();
            if version_of(&dk.ciphertext) == 5 {
                break;
            }
            assert!(
                start.elapsed() < Duration::from_secs(5),
                "this instance still seals with version {} after {:?}",
                version_of(&dk.ciphertext),
                start.elapsed()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(
            &ks.decrypt(&n, &dk5.ciphertext, ctx).await.unwrap()[..],
            &dk5.plaintext[..]
        );
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
    // Long enough that a loaded test machine checks again well within it.
    let short = Duration::from_secs(3);
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
        let c =
            SoftKeyStore::open_dir(&root.path().join("keys"), &root.path().join("kek")).unwrap();
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

fn api_error(e: kesh::client::ClientError) -> (u16, String) {
    let api = e.api().unwrap_or_else(|| panic!("not an API error: {e}"));
    (api.status, api.message.to_string())
}

/// The routes on a server: answers, errors, policy, `/v1/api`, metrics.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routes_answer_and_are_policy_checked() {
    let ops = ApiKey::generate().unwrap();
    let app = ApiKey::generate().unwrap();
    let policy = format!(
        "policy:\n  ops:\n    allow:\n    - /v1/key/rotate/app-*\n    - /v1/key/versions/app-*\n    - /v1/key/destroy-version/app-*\n    identities: [{}]\n  app:\n    allow:\n    - /v1/key/generate/*\n    - /v1/key/decrypt/*\n    - /v1/key/describe/*\n    identities: [{}]\n",
        ops.identity(),
        app.identity()
    );
    let srv = server()
        .config(&policy)
        .keystore_yaml("  soft: {}\n")
        .spawn();
    let admin = srv.client();
    let as_key = |k: &ApiKey| {
        srv.client_as(kesh::client::Credentials::ApiKey(
            ApiKey::parse(&k.expose_text()).unwrap(),
        ))
    };
    let (ops_c, app_c) = (as_key(&ops), as_key(&app));
    admin.create_key("app-key").await.unwrap();

    // MinIO's identity seals and unseals across a rotation, and may not rotate.
    let before = app_c.generate_key("app-key", b"ctx").await.unwrap();
    assert_eq!(
        api_error(app_c.rotate_key("app-key").await.unwrap_err()),
        (403, "not authorized: insufficient permissions".into())
    );
    assert_eq!(
        api_error(app_c.key_versions("app-key").await.unwrap_err()).0,
        403
    );
    let r = ops_c.rotate_key("app-key").await.unwrap();
    assert_eq!(
        r,
        kesh::api::RotateKeyResponse {
            name: "app-key".into(),
            version: 2
        }
    );
    // POST as well as PUT, as for every KES PUT route.
    let raw = admin
        .send(http::Method::POST, "/v1/key/rotate/app-key", None, None)
        .await
        .unwrap();
    assert_eq!(raw.status, 200);
    assert_eq!(&raw.body[..], b"{\"name\":\"app-key\",\"version\":3}\n");
    assert_eq!(app_c.describe_key("app-key").await.unwrap().version, 3);
    let after = app_c.generate_key("app-key", b"ctx").await.unwrap();
    assert_eq!(version_of(&after.ciphertext.0), 3);
    for dk in [&before, &after] {
        assert_eq!(
            &app_c
                .decrypt("app-key", &dk.ciphertext.0, b"ctx")
                .await
                .unwrap()
                .0[..],
            &dk.plaintext.0[..]
        );
    }

    // The listing: states and use since start.
    let v = ops_c.key_versions("app-key").await.unwrap();
    assert_eq!(v.name, "app-key");
    let rows: Vec<_> = v
        .versions
        .iter()
        .map(|v| (v.version, v.state.as_str(), v.seals, v.unseals))
        .collect();
    assert_eq!(
        rows,
        vec![
            (1, "active", 1, 1),
            (2, "active", 0, 0),
            (3, "sealing", 1, 1)
        ]
    );
    assert!(v.versions[0].last_used.is_some() && v.versions[1].last_used.is_none());

    // Destroy: refused while sealing (409), then the old version's ciphertexts are "not
    // authentic", KES's answer for any ciphertext that does not open.
    assert_eq!(
        api_error(ops_c.destroy_key_version("app-key", 3).await.unwrap_err()),
        (409, REFUSE_SEALING.into())
    );
    assert_eq!(
        api_error(ops_c.destroy_key_version("app-key", 1).await.unwrap_err()),
        (409, REFUSE_FIRST.into())
    );
    tokio::time::sleep(SEALING_GRACE).await;
    ops_c.destroy_key_version("app-key", 2).await.unwrap();
    assert_eq!(
        api_error(ops_c.destroy_key_version("app-key", 2).await.unwrap_err()),
        (404, "key version does not exist".into())
    );
    let moved = {
        let mut ct = after.ciphertext.0.clone();
        ct[5] = 2;
        ct
    };
    assert_eq!(
        api_error(app_c.decrypt("app-key", &moved, b"ctx").await.unwrap_err()),
        (400, "decryption failed: ciphertext is not authentic".into())
    );
    let raw = admin
        .send(
            http::Method::DELETE,
            "/v1/key/destroy-version/app-key/two",
            None,
            None,
        )
        .await
        .unwrap();
    assert_eq!(raw.status, 400);

    // A missing key: KES's exact 404.
    for e in [
        admin.rotate_key("app-none").await.map(drop).unwrap_err(),
        admin.key_versions("app-none").await.map(drop).unwrap_err(),
        admin.destroy_key_version("app-none", 2).await.unwrap_err(),
    ] {
        assert_eq!(api_error(e), (404, "key does not exist".into()));
    }

    // Listed in /v1/api; labelled per-version counters on /v1/metrics/kesh only.
    let routes = admin.api().await.unwrap();
    assert_eq!(routes.len(), 26);
    for (method, path) in [
        ("PUT", "/v1/key/rotate/"),
        ("GET", "/v1/key/versions/"),
        ("DELETE", "/v1/key/destroy-version/"),
    ] {
        assert!(
            routes.iter().any(|r| r.method == method && r.path == path),
            "{method} {path}"
        );
    }
    let kesh_metrics = admin.kesh_metrics().await.unwrap();
    assert!(
        kesh_metrics.contains("kesh_key_version_seals_total{key=\"app-key\",version=\"3\"} 1\n"),
        "{kesh_metrics}"
    );
    assert!(
        kesh_metrics.contains("kesh_key_version_unseals_total{key=\"app-key\",version=\"1\"} 1\n")
    );
    assert!(!admin.metrics().await.unwrap().contains("kesh_key_version"));
}

#[test]
fn cli_rotate_versions_destroy_version() {
    let srv = server().keystore_yaml("  soft: {}\n").spawn();
    let k = harness::name("cli-rot").to_string();
    srv.run(&["key", "create", &k]).ok();
    assert_eq!(
        srv.run(&["key", "rotate", &k]).ok().trim(),
        format!("rotated key '{k}': version 2 seals from now on")
    );
    assert_eq!(
        srv.run(&["key", "rotate", "--json", &k]).json(),
        serde_json::json!({"name": k, "version": 3})
    );
    let out = srv.run(&["key", "versions", &k]).ok();
    let lines: Vec<&str> = out.lines().collect();
    assert!(
        lines[0].starts_with("Version") && lines[0].contains("Last Used"),
        "{out}"
    );
    assert_eq!(lines.len(), 4, "{out}");
    assert!(
        lines[3].starts_with('3') && lines[3].contains("sealing"),
        "{out}"
    );
    let v = srv.run(&["key", "versions", "--json", &k]).json();
    assert_eq!(v["versions"].as_array().unwrap().len(), 3, "{v}");
    assert_eq!(v["versions"][0]["state"], "active");
    assert_eq!(srv.run(&["key", "info", "--json", &k]).json()["version"], 3);
    srv.run(&["key", "destroy-version", &k, "3"])
        .fails("rotate the key first");
    std::thread::sleep(SEALING_GRACE);
    assert_eq!(
        srv.run(&["key", "destroy-version", &k, "2"]).ok().trim(),
        format!("destroyed version 2 of key '{k}'")
    );
    assert_eq!(
        srv.run(&["key", "destroy-version", "--json", &k, "2"])
            .fails("key version does not exist")
            .lines()
            .count(),
        1
    );
    srv.run(&["key", "rotate", "no-such-key"])
        .fails("key does not exist");
}

/// Two `kesh server` processes on one SoftHSM token with `rotate_after: 2s` make exactly one
/// version per period between them: consecutive versions are one period apart (plus the
/// check interval), never closer and never a period skipped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scheduled_rotation_across_two_servers_makes_one_version_per_period() {
    let token = &harness::tokens().rotation;
    let keystore = format!(
        "  pkcs11:\n    module: {}\n    token: {}\n    pin: ${{KESH_PIN}}\n",
        token.module.display(),
        token.label
    );
    let name = harness::name("sched-srv").to_string();
    let period = Duration::from_secs(2);
    let extra = format!("keys:\n  - name: {name}\n    rotate_after: 2s\n");
    let pin = token.pin().expose().to_owned();
    let start = || {
        server()
            .config(&extra)
            .keystore_yaml(&keystore)
            .env("KESH_PIN", &pin)
            .spawn()
    };
    let (a, b) = (start(), start());
    tokio::time::sleep(Duration::from_secs(9)).await;
    let versions = a.client().key_versions(&name).await.unwrap().versions;
    let numbers: Vec<u32> = versions.iter().map(|v| v.version).collect();
    let expected: Vec<u32> = (1..=numbers.len() as u32).collect();
    assert_eq!(numbers, expected, "no version lost or made twice");
    assert!(
        numbers.len() >= 4,
        "one version per 2 s over 9 s: {numbers:?}"
    );
    // Never two in one period (the compare-and-rotate), never a period skipped: each version
    // follows the previous one by the period plus at most the check interval (200 ms) and
    // what a loaded test machine adds to it.
    let slack = Duration::from_millis(1500);
    let gaps: Vec<Duration> = versions
        .windows(2)
        .map(|w| (w[1].created_at - w[0].created_at).unsigned_abs())
        .collect();
    for gap in &gaps {
        assert!(
            *gap >= period && *gap < period + slack,
            "versions {gaps:?} apart; the period is {period:?}"
        );
    }
    let newest_age =
        (time::OffsetDateTime::now_utc() - versions.last().unwrap().created_at).unsigned_abs();
    assert!(newest_age < period + slack, "newest is {newest_age:?} old");
    // Both servers seal with the newest at once (within the change-marker poll).
    let newest = *numbers.last().unwrap();
    tokio::time::sleep(Duration::from_millis(600)).await;
    for srv in [&a, &b] {
        let described = srv.client().describe_key(&name).await.unwrap().version;
        assert!(described >= newest, "{described} < {newest}");
    }
}

mod token_vectors {
    //! FORMAT.md §8's vectors through the pkcs11 keystore: a version 2 with known material is
    //! written to the token in kesh's layout (as a rotation would, but with a chosen value).

    use super::*;
    use cryptoki::object::{Attribute, AttributeType, ObjectClass};
    use kesh::keystore::pkcs11::objects;

    const CONTEXT: &[u8] = br#"{"bucket":"bucket/object"}"#;
    const GCM_V2: &str = "awIAAAACawEBoKGio6SlpqeoqaqrQE4ycxjl1Xc2Jkz9yEzEyf17VOJ73dR6mPncYFyLj4PpqyvXEQ1BGRXUmO59CouK";
    const KWP_V2: &str = "awIAAAACawECAMrS9OqBRRF+JD01IXLYCtODzJSFS/A0sxPeAUuEOK8+nz7tlRlrASyoDTQc9IX0Xvp7K/GeeNeDXP+NPvq1G9LUgCBKUL/BtA==";
    const KES_V2: &str = "awIAAAAC1VFW+QHA5covOxtPw8cKRzLI4G6bFXWzocpjxB2ZcxT7+Xf7ctk2KHFrmw30DN1asLGys7S1tre4ubq7vL2+v8DBwsPExcbHyMnKyw==";

    /// Writes version 2 of `name` with key bytes `80 81 … 9f` straight to the token.
    fn write_version_two(store: &Store, name: &KeyName, scheme: Scheme) {
        let (_, token) = store.pkcs11.as_ref().unwrap();
        let (_ctx, s) = harness::raw_session(token);
        let label = format!("kesh/{name}");
        let handles = s
            .find_objects(&[
                Attribute::Class(ObjectClass::SECRET_KEY),
                Attribute::Label(label.clone().into_bytes()),
            ])
            .unwrap();
        let base = handles
            .iter()
            .filter_map(
                |h| match s.get_attributes(*h, &[AttributeType::Id]).ok()?.pop() {
                    Some(Attribute::Id(id)) => objects::Meta::decode(&id),
                    _ => None,
                },
            )
            .find(|m| m.role == objects::Role::Key && m.version == 1)
            .expect("version 1's master")
            .nonce;
        let meta = objects::Meta::new(
            objects::Role::Key,
            "00000000000000f2",
            scheme,
            Algorithm::Aes256,
            &harness::who(),
        )
        .of_version(2, &base)
        .ready();
        let key2: Vec<u8> = (0x80..0xa0).collect();
        s.create_object(&objects::master_template(&label, &meta, scheme, Some(key2)))
            .unwrap();
    }

    async fn vectors(store: Store) {
        let dek: Vec<u8> = (0x40..0x60).collect();
        let mut cases = vec![(Scheme::Gcm, GCM_V2), (Scheme::Kes, KES_V2)];
        if store.backend.kwp() {
            cases.push((Scheme::Kwp, KWP_V2));
        }
        for (scheme, vector) in cases {
            let n = harness::name(&format!("vec2-{scheme}"));
            store
                .import(
                    &n,
                    ImportKey {
                        key: Zeroizing::new([0u8; 32]),
                        algorithm: Algorithm::Aes256,
                        scheme,
                        hmac: HmacKeySource::None,
                        provenance: harness::who(),
                    },
                )
                .await
                .unwrap();
            write_version_two(&store, &n, scheme);
            // This instance has not seen version 2: the ciphertext's version makes it look.
            let pt = store
                .decrypt(&n, &harness::b64(vector), CONTEXT)
                .await
                .unwrap();
            assert_eq!(&pt[..], &dek[..], "{scheme}");
            // A fresh instance finds it in its scan, and seals with it.
            let fresh = harness::pkcs11_on(store.pkcs11.as_ref().unwrap().1.clone()).await;
            assert_eq!(fresh.describe(&n).await.unwrap().version, 2);
            let pt = fresh
                .decrypt(&n, &harness::b64(vector), CONTEXT)
                .await
                .unwrap();
            assert_eq!(&pt[..], &dek[..], "{scheme}");
            if scheme == Scheme::Kwp {
                // KWP is deterministic: version 2 seals the DEK to the vector.
                assert_eq!(
                    fresh.encrypt(&n, &dek, CONTEXT).await.unwrap(),
                    harness::b64(vector)
                );
            }
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn version_two_vectors_on_softhsm() {
        vectors(harness::pkcs11().await).await
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn version_two_vectors_on_kryoptic() {
        vectors(harness::kryoptic().await).await
    }
}
