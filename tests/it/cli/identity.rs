//! `kesh identity`: API keys, certificate and key pairs, and what `identity of` says of them.

use super::*;

#[test]
fn identity_commands() {
    // No arguments: a fresh API key and its identity, which `identity of` agrees with.
    let out = kesh(&[], &["identity"]).ok();
    let mut lines = out.lines();
    let key = lines
        .next()
        .unwrap()
        .strip_prefix("API Key")
        .unwrap()
        .trim()
        .to_owned();
    let id = lines
        .next()
        .unwrap()
        .strip_prefix("Identity")
        .unwrap()
        .trim()
        .to_owned();
    assert!(key.starts_with("kes:v1:"), "{out}");
    assert_eq!(ApiKey::parse(&key).unwrap().identity().as_str(), id);
    assert_eq!(kesh(&[], &["identity", "of", &key]).ok().trim(), id);
    assert_eq!(kesh(&[], &["identity", &key]).ok().trim(), id);
    let v = kesh(&[], &["identity", "new", "--json"]).json();
    let k = ApiKey::parse(v["api_key"].as_str().unwrap()).unwrap();
    assert_eq!(k.identity().as_str(), v["identity"]);
    let out = kesh(&[], &["identity", "new"]).ok();
    assert!(out.starts_with("API Key   kes:v1:"), "{out}");
    // kms-go's API-key vector (`kes/apikey_test.go`).
    let v = kesh(
        &[],
        &[
            "identity",
            "of",
            "--json",
            "kes:v1:AGaV6VXHasF0FnaB60WdCOeTZ8eTIDikL4zlN16c8NAs",
        ],
    )
    .json();
    assert_eq!(
        v["identity"],
        "ea9826089311fe44d7590408ede9150f7c637b6cab0a91ee6fe1aa5d9fb366f6"
    );
    kesh(&[], &["identity", "of", "kes:v1:AAAA"]).fails("neither a file nor an API key");

    // A server key/certificate pair with SANs.
    let dir = tempfile::tempdir().unwrap();
    let (kp, cp) = (dir.path().join("s.key"), dir.path().join("s.crt"));
    let (ks, cs) = (kp.to_str().unwrap(), cp.to_str().unwrap());
    let out = kesh(
        &[],
        &[
            "identity",
            "new",
            "--key",
            ks,
            "--cert",
            cs,
            "--ip",
            "127.0.0.1",
            "--dns",
            "kesh.local",
            "--expiry",
            "24h",
            "my-server",
        ],
    )
    .ok();
    let id = out
        .lines()
        .find_map(|l| l.strip_prefix("Identity"))
        .unwrap()
        .trim()
        .to_owned();
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&kp).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let pem = std::fs::read(&cp).unwrap();
    use rustls::pki_types::pem::PemObject as _;
    let der = rustls::pki_types::CertificateDer::from_pem_slice(&pem).unwrap();
    assert!(kesh::identity::has_dns_or_ip_san(&der).unwrap());
    assert_eq!(
        kesh::identity::Identity::from_certificate(&der)
            .unwrap()
            .as_str(),
        id
    );
    assert_eq!(kesh(&[], &["identity", "of", cs]).ok().trim(), id);
    // The private key file gives back the API key of the same identity.
    let v = kesh(&[], &["identity", "of", "--json", ks]).json();
    assert_eq!(v["identity"], id.as_str());
    assert_eq!(
        ApiKey::parse(v["api_key"].as_str().unwrap())
            .unwrap()
            .identity()
            .as_str(),
        id
    );
    // The pair serves as kesh's own TLS certificate; clients verify it with --ca.
    let srv = server().tls_files(&kp, &cp).spawn();
    let key_text = srv.admin.expose_text().to_string();
    let out = kesh(
        &[
            ("KES_SERVER", srv.addr.as_str()),
            ("KES_API_KEY", key_text.as_str()),
        ],
        &["status", "--short", "--ca", cs],
    )
    .ok();
    assert!(out.contains("online"), "{out}");
    drop(srv);
    // No overwriting without -f.
    kesh(&[], &["identity", "new", "--key", ks, "--cert", cs]).fails("already exists");
    let v = kesh(
        &[],
        &["identity", "new", "-f", "--json", "--key", ks, "--cert", cs],
    )
    .json();
    assert_ne!(v["identity"], id.as_str());
    kesh(&[], &["identity", "new", "--key", ks]).fails("--cert");
    kesh(
        &[],
        &[
            "identity", "new", "-f", "--key", ks, "--cert", cs, "--expiry", "soon",
        ],
    )
    .fails("not a duration");
}
