//! Where the client finds its server and credentials: the KES and MinIO variables in order,
//! certificate and key files, and server verification.

use super::*;

#[test]
fn server_and_credentials_from_the_environment() {
    // A certificate and key file pair made by `kesh identity new`, given a policy.
    let dir = tempfile::tempdir().unwrap();
    let (kp, cp) = (dir.path().join("c.key"), dir.path().join("c.crt"));
    let v = kesh(
        &[],
        &[
            "identity",
            "new",
            "--json",
            "--key",
            kp.to_str().unwrap(),
            "--cert",
            cp.to_str().unwrap(),
        ],
    )
    .json();
    let id = v["identity"].as_str().unwrap().to_owned();
    let (kp, cp) = (kp.to_str().unwrap(), cp.to_str().unwrap());
    let srv = server()
        .config(&format!(
            "policy:\n  files:\n    allow: [/v1/key/list/*]\n    identities: [{id}]\n"
        ))
        .spawn();
    let addr = srv.addr.as_str();
    let key = srv.admin.expose_text().to_string();
    let ca = srv.ca.display().to_string();
    let down = "127.0.0.1:1";

    // MINIO_KES_SERVER wins over KES_SERVER, which wins over MINIO_KMS_KES_ENDPOINT.
    let base = [
        ("KES_API_KEY", key.as_str()),
        ("SSL_CERT_FILE", ca.as_str()),
    ];
    let ls = |extra: &[(&str, &str)]| kesh(&join(&base, extra), &["key", "ls"]);
    ls(&[("MINIO_KES_SERVER", addr), ("KES_SERVER", down)]).ok();
    ls(&[("MINIO_KES_SERVER", down), ("KES_SERVER", addr)]).fails("is the server running?");
    ls(&[("KES_SERVER", addr), ("MINIO_KMS_KES_ENDPOINT", down)]).ok();
    ls(&[("MINIO_KMS_KES_ENDPOINT", addr)]).ok();
    // A comma-separated list: an unreachable endpoint is skipped.
    let list = format!("{down},https://{addr}");
    ls(&[("KES_SERVER", list.as_str())]).ok();
    // --server overrides the environment.
    kesh(
        &join(&base, &[("KES_SERVER", down)]),
        &["key", "ls", "--server", addr],
    )
    .ok();
    // Default server: 127.0.0.1:7373, which this test's CA never vouches for.
    ls(&[]).fails("127.0.0.1:7373");

    // API key precedence: MINIO_KES_API_KEY over KES_API_KEY over MINIO_KMS_KES_API_KEY.
    let stranger = ApiKey::generate().unwrap().expose_text().to_string();
    let run = |vars: &[(&str, &str)]| {
        let mut env = vec![("KES_SERVER", addr), ("SSL_CERT_FILE", ca.as_str())];
        env.extend_from_slice(vars);
        kesh(&env, &["key", "ls"])
    };
    run(&[("MINIO_KES_API_KEY", &key), ("KES_API_KEY", &stranger)]).ok();
    run(&[("MINIO_KES_API_KEY", &stranger), ("KES_API_KEY", &key)]).fails("not authorized");
    run(&[("KES_API_KEY", &key), ("MINIO_KMS_KES_API_KEY", &stranger)]).ok();
    run(&[("MINIO_KMS_KES_API_KEY", &key)]).ok();
    run(&[("KES_API_KEY", "kes:v1:AAAA")]).fails("invalid API key");
    run(&[]).fails("no credentials");
    // ls -a gives the key on the command line.
    kesh(
        &[("KES_SERVER", addr), ("SSL_CERT_FILE", ca.as_str())],
        &["ls", "-a", &key],
    )
    .ok();

    let files = |k: &'static str, c: &'static str| {
        vec![
            ("KES_SERVER", addr),
            ("SSL_CERT_FILE", ca.as_str()),
            (k, kp),
            (c, cp),
        ]
    };
    // Each variable pair works: the server identifies the certificate and applies its policy.
    let out = kesh(
        &files("KES_CLIENT_KEY", "KES_CLIENT_CERT"),
        &["identity", "info", "--json"],
    );
    assert_eq!(out.json()["identity"], id.as_str());
    assert_eq!(out.json()["policy"], "files");
    kesh(&files("KES_CLIENT_KEY", "KES_CLIENT_CERT"), &["key", "ls"]).ok();
    kesh(&files("KES_CLIENT_KEY", "KES_CLIENT_CERT"), &["status"]).fails("not authorized");
    let out = kesh(
        &files("MINIO_KES_KEY_FILE", "MINIO_KES_CERT_FILE"),
        &["identity", "info", "--json"],
    );
    assert_eq!(out.json()["identity"], id.as_str());
    let out = kesh(
        &files("MINIO_KES_CLIENT_KEY", "MINIO_KES_CLIENT_CERT"),
        &["identity", "info", "--json"],
    );
    assert_eq!(out.json()["identity"], id.as_str());
    let mut both = files("KES_CLIENT_KEY", "KES_CLIENT_CERT");
    both.push(("KES_API_KEY", key.as_str()));
    kesh(&both, &["key", "ls"]).fails("not both");
    kesh(
        &[("KES_SERVER", addr), ("KES_CLIENT_CERT", cp)],
        &["key", "ls"],
    )
    .fails("KES_CLIENT_KEY");
    kesh(
        &[
            ("KES_SERVER", addr),
            ("KES_CLIENT_CERT", cp),
            ("KES_CLIENT_KEY", "/nonexistent/key.pem"),
        ],
        &["key", "ls"],
    )
    .fails("cannot read the client key");

    // Server verification: -k skips it; an unrelated CA fails with the way out.
    kesh(
        &[("KES_SERVER", addr), ("KES_API_KEY", &key)],
        &["key", "ls", "-k"],
    )
    .ok();
    let other = tempfile::tempdir().unwrap();
    let other_ca = ServerCerts::new().write(other.path()).ca;
    let err = kesh(
        &[("KES_SERVER", addr), ("KES_API_KEY", &key)],
        &["key", "ls", "--ca", other_ca.to_str().unwrap()],
    )
    .fails("not trusted");
    assert!(err.contains("--insecure"), "{err}");
}
