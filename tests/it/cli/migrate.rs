//! `kesh migrate` from a KES `fs` keystore onto SoftHSM, and serving what it wrote.

use super::*;

/// Writes a KES `fs` key directory and its KES config; returns the config path.
fn kes_layout(dir: &Path, files: &[(&str, &[u8])]) -> PathBuf {
    let keys = dir.join("kes-keys");
    std::fs::create_dir_all(&keys).unwrap();
    for (name, value) in files {
        std::fs::write(keys.join(name), value).unwrap();
    }
    let config = dir.join("kes.yaml");
    std::fs::write(
        &config,
        "address: 0.0.0.0:7373\nadmin:\n  identity: ${KES_TEST_UNSET_ADMIN}\ntls:\n  key: k.pem\n  cert: c.pem\nkeystore:\n  fs:\n    path: ${KES_TEST_KEY_DIR}\n",
    )
    .unwrap();
    config
}

/// KES's stored-key test vector (`internal/crypto/key_test.go`): a KES key file as KES writes it.
pub(crate) const KES_VECTOR: &str = "CiQKIMiHG7XrN94FuwblJJor4f7f6rbqAl7DwsLaiIoyz0D2EAESJAognLXl4yqa4cjZTcSbsU6sNnN8kP9ARWkXwa20YQZa9HgQARoMCNithK0GEID67qYDIkAzZWNmY2RmMzhmY2JlMTQxYWUyNmExMDMwZjgxZTk2Yjc1MzM2NWE0Njc2MGFlNmI1Nzg2OThhOTdjNTlmZDIy";

/// Seals `plaintext` in KES's format with a raw key, as KES did before the migration.
fn kes_seal(key: &[u8; 32], plaintext: &[u8], context: &[u8]) -> String {
    let iv: [u8; 16] = *kesh::secret::random::<16>().unwrap();
    let nonce: [u8; 12] = *kesh::secret::random::<12>().unwrap();
    let derived = kes::derive_soft(Algorithm::Aes256, key, &iv);
    b64e(&kes::seal(
        Algorithm::Aes256,
        &derived,
        &iv,
        &nonce,
        plaintext,
        context,
    ))
}

#[test]
fn migrate_from_kes_to_softhsm() {
    // Only this test's child processes use the `migrate` token.
    let token = harness::tokens().migrate.clone();
    let dir = tempfile::tempdir().unwrap();
    let suffix = unique("m");
    let (vector, proto, legacy, corrupt, bad_name) = (
        format!("vec-{suffix}"),
        format!("proto-{suffix}"),
        format!("legacy-{suffix}"),
        format!("corrupt-{suffix}"),
        format!("bad.name-{suffix}"),
    );
    let vector_key: [u8; 32] = b64d("yIcbtes33gW7BuUkmivh/t/qtuoCXsPCwtqIijLPQPY=")
        .try_into()
        .unwrap();
    let proto_key = [0x11u8; 32];
    let proto_hmac = [0x22u8; 32];
    let legacy_key = [0x33u8; 32];
    let created = time::macros::datetime!(2023-05-06 07:08:09.123456 UTC);
    let proto_value = kes_key::encode(
        &proto_key,
        Algorithm::Aes256,
        &proto_hmac,
        created,
        "creator-id",
    );
    let legacy_value = format!(
        "{{\"bytes\":\"{}\",\"algorithm\":\"AES256-GCM_SHA256\",\"created_at\":\"2019-01-02T03:04:05Z\",\"created_by\":\"old-admin\"}}",
        b64e(&legacy_key)
    );
    let kes_config = kes_layout(
        dir.path(),
        &[
            (&vector, KES_VECTOR.as_bytes()),
            (&proto, proto_value.as_bytes()),
            (&legacy, legacy_value.as_bytes()),
            (&corrupt, b"CiQKIMiHG7XrN94Fuwbl"),
            (&bad_name, KES_VECTOR.as_bytes()),
        ],
    );
    let key_dir = dir.path().join("kes-keys");
    let keystore = format!(
        "  pkcs11:\n    module: {}\n    token: {}\n    pin: ${{KESH_TEST_PIN}}\n    profile: softhsm\n",
        token.module.display(),
        token.label
    );
    let kesh_config = dir.path().join("kesh.yaml");
    // Variables outside `keystore:` need not be set to migrate.
    std::fs::write(
        &kesh_config,
        format!("admin:\n  identity: ${{KESH_TEST_UNSET_ADMIN}}\nkeystore:\n{keystore}"),
    )
    .unwrap();

    // Ciphertexts KES produced before the migration.
    let ctx = b"{\"bucket\":\"photos\",\"object\":\"cat.jpg\"}";
    let sealed = [
        (&vector, kes_seal(&vector_key, b"vector secret", ctx)),
        (&proto, kes_seal(&proto_key, b"proto secret", ctx)),
        (&legacy, kes_seal(&legacy_key, b"legacy secret", ctx)),
    ];

    let pin = token.pin().expose().to_owned();
    let key_dir_s = key_dir.display().to_string();
    let env = [
        ("KESH_TEST_PIN", pin.as_str()),
        ("KES_TEST_KEY_DIR", key_dir_s.as_str()),
    ];
    let migrate = |extra: &[&str]| kesh_migrate(&env, &kes_config, &kesh_config, extra);

    // First run: three imported, the corrupt file and the bad name reported, exit non-zero.
    let run = migrate(&["--json"]);
    assert!(!run.out.status.success());
    assert!(
        run.stderr().contains("2 of 5 keys failed"),
        "{}",
        run.stderr()
    );
    let report: Value = serde_json::from_str(run.stdout().trim()).unwrap();
    assert_eq!(report["imported"], 3, "{report}");
    assert_eq!(report["failed"], 2, "{report}");
    for n in [&vector, &proto, &legacy] {
        assert_eq!(outcome(&report, n)["outcome"], "imported", "{report}");
    }
    let c = outcome(&report, &corrupt);
    assert_eq!(c["outcome"], "failed");
    assert!(
        c["error"]
            .as_str()
            .unwrap()
            .contains("invalid KES key value"),
        "{c}"
    );
    assert!(outcome(&report, &bad_name)["error"]
        .as_str()
        .unwrap()
        .contains("not a valid key name"));
    // No key material in the report or on stderr.
    for secret in [b64e(&vector_key), b64e(&proto_key), b64e(&legacy_key)] {
        assert!(!run.stdout().contains(&secret) && !run.stderr().contains(&secret));
    }

    // Without --merge or --force, existing keys are refused and left alone.
    let run = migrate(&[]);
    assert!(!run.out.status.success());
    assert!(
        run.stdout().contains("already exists; use --merge"),
        "{}",
        run.stdout()
    );
    assert!(
        run.stderr().contains("5 of 5 keys failed to migrate") && run.stderr().contains("--merge"),
        "{}",
        run.stderr()
    );

    // Fix the corrupt file and rerun with --merge: idempotent for the rest.
    std::fs::remove_file(key_dir.join(&bad_name)).unwrap();
    std::fs::write(key_dir.join(&corrupt), KES_VECTOR).unwrap();
    let report = migrate(&["--merge", "--json"]).json();
    assert_eq!(report["imported"], 1, "{report}");
    assert_eq!(report["skipped"], 3, "{report}");
    assert_eq!(report["failed"], 0, "{report}");
    assert_eq!(outcome(&report, &vector)["reason"], "already migrated");
    let out = migrate(&["--merge"]).ok();
    assert!(out.contains("0 imported, 4 skipped, 0 failed"), "{out}");

    // A different key under an existing name: --merge refuses, --force replaces.
    let replacement = [0x44u8; 32];
    std::fs::write(
        key_dir.join(&proto),
        kes_key::encode(&replacement, Algorithm::Aes256, &proto_hmac, created, "x"),
    )
    .unwrap();
    let run = migrate(&["--merge", "--json"]);
    assert!(!run.out.status.success());
    let report: Value = serde_json::from_str(run.stdout().trim()).unwrap();
    assert!(outcome(&report, &proto)["error"]
        .as_str()
        .unwrap()
        .contains("--force"));
    // Put the original back, then force: every key is replaced by the same key.
    std::fs::write(key_dir.join(&proto), &proto_value).unwrap();
    let report = migrate(&["--force", "--json"]).json();
    assert_eq!(report["imported"], 4, "{report}");
    assert_eq!(outcome(&report, &proto)["replaced"], true, "{report}");

    // Serve the migrated keys: every KES ciphertext decrypts; provenance survives.
    let srv = server()
        .keystore_yaml(&keystore)
        .env("KESH_TEST_PIN", &pin)
        .spawn();
    let ctx_b64 = b64e(ctx);
    for (name, ct) in &sealed {
        let v = srv
            .run(&["key", "decrypt", "--json", name, ct, &ctx_b64])
            .json();
        let pt = b64d(v["plaintext"].as_str().unwrap());
        assert!(pt.ends_with(b" secret"), "{name}");
    }
    let v = srv.run(&["key", "info", "--json", &proto]).json();
    assert_eq!(v["created_by"], "creator-id");
    assert_eq!(v["created_at"], "2023-05-06T07:08:09.123456Z");
    let v = srv.run(&["key", "info", "--json", &vector]).json();
    assert_eq!(v["created_at"], "2024-01-12T10:39:20.886816Z");
    let v = srv.run(&["key", "info", "--json", &legacy]).json();
    assert_eq!(v["created_by"], "old-admin");
    // New data keys under a migrated key are KES-format and open with the KES key.
    let v = srv.run(&["key", "dek", "--json", &proto, &ctx_b64]).json();
    let ct = b64d(v["ciphertext"].as_str().unwrap());
    let parts = kes::parse(&ct).unwrap();
    let derived = kes::derive_soft(Algorithm::Aes256, &proto_key, &parts.iv);
    assert_eq!(
        kes::open(Algorithm::Aes256, &derived, &parts, ctx)
            .unwrap()
            .as_slice(),
        b64d(v["plaintext"].as_str().unwrap()).as_slice()
    );
    for n in [&vector, &proto, &legacy, &corrupt] {
        srv.run(&["key", "rm", n]).ok();
    }

    // ChaCha20 keys: an HSM cannot hold them (reported, the run exits non-zero); the embedded
    // keystore can, and their KES ciphertexts decrypt there.
    let chacha_dir = dir.path().join("chacha");
    let chacha = format!("chacha-{suffix}");
    let chacha_key = [0x55u8; 32];
    let chacha_config = kes_layout(
        &chacha_dir,
        &[(
            &chacha,
            kes_key::encode(&chacha_key, Algorithm::ChaCha20, &proto_hmac, created, "c").as_bytes(),
        )],
    );
    let chacha_keys = chacha_dir.join("kes-keys").display().to_string();
    let args = |to: &Path| {
        vec![
            "migrate".to_owned(),
            "--json".to_owned(),
            "--from".to_owned(),
            chacha_config.display().to_string(),
            "--to".to_owned(),
            to.display().to_string(),
        ]
    };
    let run_chacha = |to: &Path| {
        let a = args(to);
        let a: Vec<&str> = a.iter().map(String::as_str).collect();
        kesh(
            &[
                ("KESH_TEST_PIN", pin.as_str()),
                ("KES_TEST_KEY_DIR", chacha_keys.as_str()),
            ],
            &a,
        )
    };
    let run = run_chacha(&kesh_config);
    assert!(!run.out.status.success());
    let report: Value = serde_json::from_str(run.stdout().trim()).unwrap();
    assert!(
        outcome(&report, &chacha)["error"]
            .as_str()
            .unwrap()
            .contains("ChaCha20"),
        "{report}"
    );
    let soft_config = chacha_dir.join("soft.yaml");
    harness::write_private(&chacha_dir.join("kek"), b64e(&[0x66u8; 32]));
    harness::write_soft_keystore_config(
        &soft_config,
        &chacha_dir.join("soft-keys"),
        &chacha_dir.join("kek"),
    );
    let report = run_chacha(&soft_config).json();
    assert_eq!(outcome(&report, &chacha)["outcome"], "imported", "{report}");
    let store = kesh::keystore::soft::SoftKeyStore::open_dir(
        &chacha_dir.join("soft-keys"),
        &chacha_dir.join("kek"),
    )
    .unwrap();
    let iv = [3u8; 16];
    let nonce = [4u8; 12];
    let derived = kes::derive_soft(Algorithm::ChaCha20, &chacha_key, &iv);
    let ct = kes::seal(Algorithm::ChaCha20, &derived, &iv, &nonce, b"xchacha", ctx);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let name = kesh::name::KeyName::new(&chacha).unwrap();
    let pt = rt
        .block_on(kesh::keystore::KeyStore::decrypt(&store, &name, &ct, ctx))
        .unwrap();
    assert_eq!(pt.as_slice(), b"xchacha");

    // Errors that stop the run before any key: a KES keystore kesh does not read, a Vault
    // keystore without a way to log in, a missing directory.
    let aws = dir.path().join("aws.yaml");
    std::fs::write(
        &aws,
        "keystore:\n  aws:\n    secretsmanager:\n      region: us-east-1\n",
    )
    .unwrap();
    let vault = dir.path().join("vault.yaml");
    std::fs::write(
        &vault,
        "keystore:\n  vault:\n    endpoint: https://127.0.0.1:8200\n",
    )
    .unwrap();
    for (from, needle) in [
        (&aws, "kesh migrate reads KES's `fs` and `vault` keystores"),
        (&vault, "export VAULT_TOKEN"),
    ] {
        kesh_migrate(&[("KESH_TEST_PIN", pin.as_str())], from, &kesh_config, &[]).fails(needle);
    }
    let no_key_dir = [
        ("KESH_TEST_PIN", pin.as_str()),
        ("KES_TEST_KEY_DIR", "/nonexistent/kes"),
    ];
    kesh_migrate(&no_key_dir, &kes_config, &kesh_config, &[])
        .fails("cannot read the KES key directory");
    let no_pin = [("KES_TEST_KEY_DIR", key_dir_s.as_str())];
    kesh_migrate(&no_pin, &kes_config, &kesh_config, &[]).fails("KESH_TEST_PIN");
}
