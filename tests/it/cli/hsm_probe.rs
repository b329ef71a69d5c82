//! `kesh hsm probe` against SoftHSM.

use super::*;

#[test]
fn hsm_probe_on_softhsm() {
    let token = harness::tokens().probe.clone();
    let pin = token.pin().expose().to_owned();
    let module = token.module.display().to_string();
    let env = [("KESH_PROBE_PIN", pin.as_str())];

    // `kesh hsm probe` of one token, its PIN in KESH_PROBE_PIN.
    let probe = |env: &[(&str, &str)], label: &str| {
        kesh(
            env,
            &[
                "hsm",
                "probe",
                "--module",
                &module,
                "--token",
                label,
                "--pin-env",
                "KESH_PROBE_PIN",
            ],
        )
    };
    let out = probe(&env, &token.label).ok();
    for line in [
        "gcm        yes (CKM_AES_GCM)",
        "kwp        yes (CKM_AES_KEY_WRAP_PAD)",
        "kes        yes (CKM_SHA256_HMAC)",
        "GCM IVs    from the caller",
        "Logged in  yes",
    ] {
        assert!(
            out.lines().any(|l| l == line || l.starts_with(line)),
            "{line}: {out}"
        );
    }
    assert!(
        out.contains(&format!("    token: {}\n", token.label)),
        "{out}"
    );
    assert!(out.contains("    scheme: gcm\n    iv: caller\n"), "{out}");

    // The same through --config, as JSON; the recommended section parses as a keystore.
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("kesh.yaml");
    std::fs::write(
        &config,
        format!(
            "keystore:\n  pkcs11:\n    module: {module}\n    token: {}\n    pin: ${{KESH_PROBE_PIN}}\n",
            token.label
        ),
    )
    .unwrap();
    let v = kesh(
        &env,
        &[
            "hsm",
            "probe",
            "--json",
            "--config",
            config.to_str().unwrap(),
        ],
    )
    .json();
    let t = &v["token"];
    assert_eq!(t["label"], token.label.as_str());
    for s in t["schemes"].as_array().unwrap() {
        assert_eq!(s["supported"], true, "{s}");
        assert_eq!(s["listed"], true, "{s}");
    }
    assert_eq!(t["gcm_iv"], "caller");
    assert_eq!(t["recommended_scheme"], "gcm");
    assert!(v["slots"]
        .as_array()
        .unwrap()
        .iter()
        .any(|s| s["token"]["label"] == token.label.as_str()));
    let yaml: serde_yaml::Value =
        serde_yaml::from_str(t["recommended_config"].as_str().unwrap()).unwrap();
    let section = yaml.get("keystore").unwrap();
    let mut section = section.clone();
    section["pkcs11"]["pin"] = serde_yaml::Value::from("x");
    assert!(kesh::config::keystore::KeystoreConfig::from_value(&section).is_ok());

    // Without a token: the slot list and what to add.
    let out = kesh(&[], &["hsm", "probe", "--module", &module]).ok();
    assert!(
        out.contains(&token.label) && out.contains("--pin-env"),
        "{out}"
    );
    // Errors that say what to do.
    kesh(
        &[],
        &["hsm", "probe", "--module", "/nonexistent/libpkcs11.so"],
    )
    .fails("cannot load the PKCS#11 module");
    kesh(
        &[],
        &["hsm", "probe", "--module", &module, "--token", &token.label],
    )
    .fails("--pin-env");
    probe(&[("KESH_PROBE_PIN", "wrong-pin")], &token.label).fails("check the PIN");
    probe(&env, "no-such-token").fails("no initialized token");
}
