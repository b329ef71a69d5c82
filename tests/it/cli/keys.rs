//! `kesh key …` and `kesh log --error` against a server, in human and `--json` mode.

use super::*;

#[test]
fn key_commands_human_and_json() {
    let srv = server().spawn();
    let (a, b) = (unique("cli-a"), unique("cli-b"));

    // create: a sentence for people, a JSON line per key for scripts.
    let out = srv.run(&["key", "create", &a]).ok();
    assert_eq!(out.trim(), format!("created key '{a}'"));
    let lines = srv.run(&["key", "create", "--json", &b]).json_lines();
    assert_eq!(
        lines,
        vec![serde_json::json!({"name": b, "status": "created"})]
    );
    let err = srv.run(&["key", "create", &a]).fails("key already exists");
    assert!(err.starts_with("Error: "), "{err}");

    // info
    let out = srv.run(&["key", "info", &a]).ok();
    let mut rows = out.lines();
    assert!(rows.next().unwrap().starts_with("Name"), "{out}");
    let row = rows.next().unwrap();
    assert!(row.starts_with(&a) && row.contains("AES256"), "{out}");
    assert!(row.contains(&srv.admin.identity().to_string()), "{out}");
    let v = srv.run(&["key", "info", "--json", &a]).json();
    assert_eq!(v["name"], a.as_str());
    assert_eq!(v["algorithm"], "AES256");
    assert_eq!(v["created_by"], srv.admin.identity().as_str());
    srv.run(&["key", "info", "missing-key"])
        .fails("key does not exist");

    // ls: prefix and all
    let v = srv.run(&["key", "ls", "--json", "cli"]).json();
    let names: Vec<&str> = v["names"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n.as_str().unwrap())
        .collect();
    assert!(
        names.contains(&a.as_str()) && names.contains(&b.as_str()),
        "{v}"
    );
    let out = srv.run(&["key", "ls"]).ok();
    assert_eq!(out.lines().next(), Some("Key"));
    assert!(out.lines().any(|l| l == a), "{out}");
    let out = srv.run(&["ls"]).ok();
    assert!(out.lines().any(|l| l == b), "{out}");
    // `kes` flags kesh accepts and ignores.
    let same = srv.run(&["ls", "--color", "never", "-e", "default"]).ok();
    assert_eq!(same, out);

    // dek → decrypt with the same context; a wrong context is refused.
    let ctx = b64e(b"{\"bucket\":\"b\"}");
    let v = srv.run(&["key", "dek", "--json", &a, &ctx]).json();
    let (pt, ct) = (
        v["plaintext"].as_str().unwrap(),
        v["ciphertext"].as_str().unwrap(),
    );
    assert_eq!(b64d(pt).len(), 32);
    let v = srv.run(&["key", "decrypt", "--json", &a, ct, &ctx]).json();
    assert_eq!(v["plaintext"], pt);
    let out = srv.run(&["key", "decrypt", &a, ct, &ctx]).ok();
    assert_eq!(out.trim(), pt);
    srv.run(&["key", "decrypt", &a, ct, &b64e(b"other")])
        .fails("decryption failed: ciphertext is not authentic");
    let out = srv.run(&["key", "dek", &a]).ok();
    assert!(
        out.starts_with("Plaintext") && out.contains("\nCiphertext"),
        "{out}"
    );

    // import, encrypt a message, decrypt it back.
    let imported = unique("cli-imp");
    let key = b64e(&[7u8; 32]);
    let out = srv.run(&["key", "import", &imported, &key]).ok();
    assert_eq!(out.trim(), format!("imported key '{imported}'"));
    let chacha = unique("cli-chacha");
    let v = srv
        .run(&[
            "key", "import", "--json", "--cipher", "ChaCha20", &chacha, &key,
        ])
        .json();
    assert_eq!(v, serde_json::json!({"name": chacha, "status": "imported"}));
    let v = srv.run(&["key", "info", "--json", &chacha]).json();
    assert_eq!(v["algorithm"], "ChaCha20");
    srv.run(&["key", "import", "--cipher", "DES", &unique("cli-des"), &key])
        .fails("algorithm 'DES' is not supported");
    srv.run(&["key", "dek", "missing-key"])
        .fails("key does not exist");
    srv.run(&["key", "encrypt", &imported, "x", "--context", "%%"])
        .fails("the context is not valid base64");
    srv.run(&["key", "rm", &chacha]).ok();
    srv.run(&["key", "import", &imported, &b64e(&[1u8; 16])])
        .fails("must be 32 bytes");
    srv.run(&["key", "import", &unique("cli-bad"), "not base64!"])
        .fails("not valid base64");
    let v = srv
        .run(&["key", "encrypt", "--json", &imported, "hello kesh"])
        .json();
    let ct = v["ciphertext"].as_str().unwrap().to_owned();
    // A KES key: the ciphertext is KES's format, so it opens in the host with the raw key.
    let raw = b64d(&ct);
    let parts = kes::parse(&raw).unwrap();
    let derived = kes::derive_soft(Algorithm::Aes256, &[7u8; 32], &parts.iv);
    assert_eq!(
        kes::open(Algorithm::Aes256, &derived, &parts, b"")
            .unwrap()
            .as_slice(),
        b"hello kesh"
    );
    let out = srv.run(&["key", "decrypt", &imported, &ct]).ok();
    assert_eq!(b64d(&out), b"hello kesh");
    let ct_human = srv.run(&["key", "encrypt", &imported, "again"]).ok();
    let v = srv
        .run(&["key", "decrypt", "--json", &imported, ct_human.trim()])
        .json();
    assert_eq!(b64d(v["plaintext"].as_str().unwrap()), b"again");

    // rm
    let out = srv.run(&["key", "rm", &a]).ok();
    assert_eq!(out.trim(), format!("deleted key '{a}'"));
    let v = srv
        .run(&["key", "rm", "--json", &b, &imported])
        .json_lines();
    assert_eq!(v.len(), 2);
    srv.run(&["key", "rm", &a]).fails("key does not exist");
    srv.run(&["key", "info", &b])
        .fails("key does not exist (404)");

    // Usage errors exit non-zero with clap's message on stderr.
    srv.run(&["key", "create"]).fails("required");
    srv.run(&["key", "frobnicate"])
        .fails("unrecognized subcommand");
}

/// `kesh log --error` follows the error stream, in both modes: a keystore whose key directory
/// vanished under it fails every create with a 502, and each failure is an error event.
#[test]
fn error_log_follows_server_errors() {
    let dir = tempfile::tempdir().unwrap();
    let keys = dir.path().join("keys");
    let kek = dir.path().join("kek");
    harness::write_private(&kek, hex::encode([7u8; 32]));
    let srv = server()
        .keystore_yaml(&harness::soft_keystore_section(&keys, &kek))
        .spawn();
    srv.run(&["key", "create", &unique("before")]).ok();
    std::fs::remove_dir_all(&keys).unwrap();
    let mut json_child = srv.spawn_cli(&["log", "--error", "--json", "--count", "1"]);
    let mut human_child = srv.spawn_cli(&["log", "--error", "--count", "1"]);
    let mut tries = 0;
    while json_child.try_wait().unwrap().is_none() || human_child.try_wait().unwrap().is_none() {
        assert!(tries < 500, "an error-log subscriber saw no event");
        tries += 1;
        srv.run(&["key", "create", &unique("lost")])
            .fails("failed to create key");
    }
    for child in [json_child, human_child] {
        let text = wait_ok(child);
        assert!(
            text.contains("level=ERROR") && text.contains("failed to create key"),
            "{text}"
        );
    }
}
