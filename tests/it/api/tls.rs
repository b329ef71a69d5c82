//! TLS and client certificates: which certificates get in, which identity they carry, and
//! `skip_auth` routes.

use super::*;

/// Ed25519 (MinIO's API keys), ECDSA P-256/P-384 and RSA client certificates all work, each
/// identity is the SPKI hash, and unknown identities get 403.
pub(super) async fn client_certificate_types(store: Store) {
    let algs: [&'static rcgen::SignatureAlgorithm; 4] = [
        &rcgen::PKCS_ED25519,
        &rcgen::PKCS_ECDSA_P256_SHA256,
        &rcgen::PKCS_ECDSA_P384_SHA384,
        &rcgen::PKCS_RSA_SHA256,
    ];
    let certs: Vec<(Credentials, Identity)> = algs.iter().map(|a| client_cert(a)).collect();
    let (unknown, _) = client_cert(&rcgen::PKCS_ECDSA_P256_SHA256);
    let policies = [TestPolicy {
        name: "clients",
        allow: vec!["/v1/key/*", "/v1/status"],
        deny: vec![],
        identities: certs.iter().map(|(_, id)| id.clone()).collect(),
    }];
    let srv = server().store(store).policies(policies).start().await;
    let k = name("certs");
    srv.admin().create_key(&k).await.unwrap();
    for (creds, id) in certs {
        let c = srv.client(creds);
        let me = c.describe_self().await.unwrap();
        assert_eq!(me.identity, id.to_string());
        assert_eq!(me.policy, "clients");
        let g = c.generate_key(&k, b"ctx").await.unwrap();
        assert_eq!(
            *c.decrypt(&k, &g.ciphertext.0, b"ctx").await.unwrap().0,
            *g.plaintext.0
        );
        let r = c.send(Method::GET, "/v1/status", None, None).await.unwrap();
        assert_eq!(r.version, http::Version::HTTP_2, "ALPN picks h2");
    }
    let u = srv.client(unknown);
    for (path, status, message) in [
        (
            "/v1/key/list/",
            403,
            "not authorized: insufficient permissions",
        ),
        ("/v1/identity/self/describe", 404, "identity does not exist"),
    ] {
        assert_request_error(&u, Method::GET, path, None, status, message).await;
    }
    // The admin's self-describe.
    let me = srv.admin().describe_self().await.unwrap();
    assert!(me.admin);
    assert_eq!(me.identity, srv.admin_id());
}

/// Without a client certificate the TLS handshake is refused; TLS 1.2 works with Ed25519.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_requires_client_certificates() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let srv = server().store(harness::soft()).start().await;

    let no_cert = raw_tls::client_config(&srv.certs.ca, false, None);
    match raw_tls::get(srv.addr, Arc::new(no_cert), "/version").await {
        Err(e) => assert!(
            e.to_string().contains("CertificateRequired") || e.to_string().contains("certificate"),
            "{e}"
        ),
        Ok(buf) => panic!(
            "server answered without a client certificate: {:?}",
            String::from_utf8_lossy(&buf)
        ),
    }

    // TLS 1.2 + HTTP/1.1 with an API-key (Ed25519) certificate.
    let key = ApiKey::parse(&srv.admin.expose_text()).unwrap();
    let tls12 = raw_tls::client_config(&srv.certs.ca, true, Some(&key));
    let mut tls = raw_tls::connect(srv.addr, Arc::new(tls12)).await.unwrap();
    assert_eq!(
        tls.get_ref().1.protocol_version(),
        Some(rustls::ProtocolVersion::TLSv1_2)
    );
    tls.write_all(
        b"GET /v1/identity/self/describe HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .await
    .unwrap();
    let mut buf = Vec::new();
    tls.read_to_end(&mut buf).await.unwrap();
    let text = String::from_utf8_lossy(&buf);
    assert!(text.starts_with("HTTP/1.1 200 OK\r\n"), "{text}");
    assert!(
        text.contains(&format!("\"identity\":\"{}\"", key.identity())),
        "{text}"
    );
}

/// `api: {path: {skip_auth: true}}` makes certificates optional and skips the policy check.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn skip_auth_and_route_timeouts() {
    let (creds, _) = client_cert(&rcgen::PKCS_ED25519);
    let srv = server()
        .route("/v1/status", true, Some(Duration::from_secs(3)))
        .start()
        .await;
    let stranger = srv.client(creds);
    stranger.status().await.unwrap();
    assert_not_allowed(&stranger, Method::GET, "/v1/metrics").await;
    let routes = srv.admin().api().await.unwrap();
    assert_eq!(
        routes
            .iter()
            .find(|r| r.path == "/v1/status")
            .unwrap()
            .timeout,
        3
    );
}

/// `tls.auth: on`: only certificates that chain to `tls.ca` get in.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_auth_on_verifies_client_chains() {
    let (ca, ca_key) = harness::certs::ca("client CA");
    let (issued, id) = harness::certs::client_cert_issued_by(&ca, &ca_key, "minio");
    let (self_signed, self_id) = client_cert(&rcgen::PKCS_ED25519);

    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca.der().clone()).unwrap();
    let policies = [TestPolicy::allowing(
        "p",
        &["/v1/status"],
        [id.clone(), self_id],
    )];
    let srv = server()
        .policies(policies)
        .client_auth(ClientAuth::VerifyChain(Arc::new(roots)))
        .start()
        .await;
    let c = srv.client(issued);
    c.status().await.unwrap();
    assert_eq!(
        c.list_keys("").await.unwrap_err().api(),
        Some(&errors::NOT_ALLOWED)
    );
    match srv.client(self_signed).status().await {
        Err(ClientError::Connect(_)) => {}
        other => panic!("a certificate outside tls.ca must not get in: {other:?}"),
    }
}

/// With some route on `skip_auth`, certificates become optional: that route answers without
/// one, every other route says 400 `tls: client certificate is required`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn skip_auth_makes_certificates_optional() {
    let srv = server().route("/v1/ready", true, None).start().await;
    let config = Arc::new(raw_tls::client_config(&srv.certs.ca, false, None));
    let get = |path: &'static str| {
        let config = config.clone();
        async move { String::from_utf8(raw_tls::get(srv.addr, config, path).await.unwrap()).unwrap() }
    };
    let ready = get("/v1/ready").await;
    assert!(ready.starts_with("HTTP/1.1 200 OK\r\n"), "{ready}");
    let status = get("/v1/status").await;
    assert!(
        status.starts_with("HTTP/1.1 400 Bad Request\r\n"),
        "{status}"
    );
    assert!(
        status.ends_with("\r\n\r\n{\"message\":\"tls: client certificate is required\"\n}"),
        "{status}"
    );
}

/// KES picks the client's identity from the one non-CA certificate it sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identity_comes_from_the_single_end_entity_certificate() {
    let (ca, _) = harness::certs::ca("client CA");
    let key = ApiKey::generate().unwrap();
    let (leaf, pkcs8) = key.certificate().unwrap();
    let (other, _) = ApiKey::generate().unwrap().certificate().unwrap();
    let policies = [TestPolicy::allowing("p", &["/v1/status"], [key.identity()])];
    let srv = server().policies(policies).start().await;
    let creds = |chain: Vec<Vec<u8>>| Credentials::Certificate {
        chain: chain.into_iter().map(CertificateDer::from).collect(),
        key: PrivateKeyDer::try_from(pkcs8.to_vec()).unwrap(),
    };
    let with_ca = srv.client(creds(vec![leaf.clone(), ca.der().to_vec()]));
    with_ca.status().await.unwrap();
    assert_eq!(
        with_ca.describe_self().await.unwrap().identity,
        key.identity().to_string()
    );
    let two = srv.client(creds(vec![leaf, other]));
    assert_request_error(
        &two,
        Method::GET,
        "/v1/status",
        None,
        400,
        "tls: received more than one client certificate",
    )
    .await;
}
