//! Errors byte for byte as KES writes them: bad requests and limits, typed errors through the
//! client, keystore failures as 5xx, panics and deadlines.

use super::*;

pub(super) async fn request_errors_and_limits(store: Store) {
    let srv = server().store(store).start().await;
    let c = srv.admin();
    let k = name("errs");
    c.create_key(&k).await.unwrap();

    // Invalid names and patterns, decoded from the path first.
    for (path, status, message) in [
        (
            "/v1/key/create/my.key",
            400,
            "key name 'my.key' is empty, too long or contains invalid characters",
        ),
        (
            "/v1/key/create/",
            400,
            "key name '' is empty, too long or contains invalid characters",
        ),
        (
            "/v1/key/create/a%2Fb",
            400,
            "key name 'a/b' is empty, too long or contains invalid characters",
        ),
    ] {
        assert_request_error(&c, Method::POST, path, None, status, message).await;
    }
    let long = "a".repeat(81);
    for (path, status, message) in [
        (
            &*format!("/v1/key/describe/{long}"),
            400,
            &*format!("key name '{long}' is empty, too long or contains invalid characters"),
        ),
        (
            "/v1/key/list/*-*",
            400,
            "listing pattern '*-*' is empty, too long or is invalid",
        ),
        (
            "/v1/key/list/_",
            400,
            "listing pattern '_' is empty, too long or is invalid",
        ),
        (
            "/v1/policy/describe/a.b",
            400,
            "policy name 'a.b' is empty, too long or contains invalid characters",
        ),
        (
            "/v1/identity/describe/a.b",
            400,
            "identity 'a.b' is empty, too long or contains invalid characters",
        ),
    ] {
        assert_request_error(&c, Method::GET, path, None, status, message).await;
    }

    // Bodies: bad JSON, bad base64 (unpadded, URL-safe), wrong types, empty body, over the limit.
    let gen = format!("/v1/key/generate/{k}");
    for bad in [
        &b"{"[..],
        b"{\"context\":\"AAE\"}",
        b"{\"context\":\"AA-_\"}",
        b"{\"context\":5}",
        b"[]",
        b"\"x\"",
    ] {
        assert_request_error(
            &c,
            Method::POST,
            &gen,
            Some(bad),
            400,
            "invalid request body",
        )
        .await;
    }
    assert_request_error(
        &c,
        Method::POST,
        &format!("/v1/key/encrypt/{k}"),
        Some(b""),
        400,
        "invalid request body",
    )
    .await;
    // `Content-Length: 0` on generate means an empty context, as in KES.
    let g: api::GenerateKeyResponse = json(&send(&c, Method::POST, &gen, Some(b"")).await);
    let plain = c.decrypt(&k, &g.ciphertext.0, b"").await.unwrap();
    assert_eq!(*plain.0, *g.plaintext.0);
    // Field names are case-insensitive, unknown fields ignored, trailing bytes ignored.
    let g: api::GenerateKeyResponse = json(
        &send(
            &c,
            Method::POST,
            &gen,
            Some(
                format!(
                    "{{\"CONTEXT\":\"{}\",\"version\":\"v1\",\"x\":[1]}} junk",
                    b64e(b"c")
                )
                .as_bytes(),
            ),
        )
        .await,
    );
    assert_eq!(
        *c.decrypt(&k, &g.ciphertext.0, b"c").await.unwrap().0,
        *g.plaintext.0
    );
    // Exactly at the limit is read; one byte over is refused.
    let pad = 1_000_000 - "{\"context\":\"\"}".len();
    let at_limit = format!("{{\"context\":\"\"}}{}", " ".repeat(pad));
    assert_eq!(
        send(&c, Method::POST, &gen, Some(at_limit.as_bytes()))
            .await
            .status,
        200
    );
    let over = format!("{at_limit} ");
    for (path, status, message) in [
        (&*gen, 400, "invalid request body"),
        (
            &*format!("/v1/key/import/{}", name("imp")),
            400,
            "invalid import key request body",
        ),
    ] {
        assert_request_error(
            &c,
            Method::POST,
            path,
            Some(over.as_bytes()),
            status,
            message,
        )
        .await;
    }

    // The name is checked before the body is read.
    assert_request_error(
        &c,
        Method::POST,
        "/v1/key/import/a.b",
        Some(over.as_bytes()),
        400,
        "key name 'a.b' is empty, too long or contains invalid characters",
    )
    .await;

    // Import: body, cipher (checked first), then size.
    let imp = format!("/v1/key/import/{}", name("imp"));
    assert_request_error(
        &c,
        Method::POST,
        &imp,
        Some(b"{\"key\":\"!!\"}"),
        400,
        "invalid import key request body",
    )
    .await;
    let key32 = b64e(&[7u8; 32]);
    for (method, path, body, status, message) in [
        (
            Method::POST,
            &*imp,
            Some(format!("{{\"key\":\"{key32}\",\"cipher\":\"AES\"}}").as_bytes()),
            406,
            "algorithm 'AES' is not supported",
        ),
        (
            Method::POST,
            &*imp,
            Some(format!("{{\"key\":\"{key32}\"}}").as_bytes()),
            406,
            "algorithm '' is not supported",
        ),
        (
            Method::POST,
            &*imp,
            Some(format!("{{\"key\":\"{}\",\"cipher\":\"AES256\"}}", b64e(&[7u8; 16])).as_bytes()),
            406,
            "invalid key size for 'AES256'",
        ),
        (
            Method::POST,
            &*format!("/v1/key/import/{k}"),
            Some(format!("{{\"key\":\"{key32}\",\"cipher\":\"AES256\"}}").as_bytes()),
            400,
            "key already exists",
        ),
    ] {
        assert_request_error(&c, method, path, body, status, message).await;
    }

    // Methods: wrong method is 405 with `Accept`; HEAD is not GET; POST is fine on PUT routes.
    let r = send(&c, Method::GET, &format!("/v1/key/create/{k}"), None).await;
    assert_error(&r, 405, "received method 'GET' expected 'PUT'");
    assert_eq!(r.headers["accept"], "PUT");
    for (method, path, status, message) in [
        (
            Method::POST,
            "/v1/key/list/",
            405,
            "received method 'POST' expected 'GET'",
        ),
        (
            Method::PUT,
            &*format!("/v1/key/delete/{k}"),
            405,
            "received method 'PUT' expected 'DELETE'",
        ),
    ] {
        assert_request_error(&c, method, path, None, status, message).await;
    }
    // A HEAD response has no body to carry the message; the status and `Accept` still say it.
    let r = send(&c, Method::HEAD, "/v1/key/list/", None).await;
    assert_eq!(r.status, 405);
    assert_eq!(r.headers["accept"], "GET");

    // Unknown paths: Go's plain-text 404, before any authentication.
    let r = send(&c, Method::GET, "/v1/key/bulk/decrypt/x", None).await;
    assert_eq!(r.status, 404);
    assert_eq!(r.headers["content-type"], "text/plain; charset=utf-8");
    assert_eq!(&r.body[..], b"404 page not found\n");
    let r = send(&c, Method::GET, "/v1//key/list/", None).await;
    assert_eq!(r.status, 301);
    assert_eq!(r.headers["location"], "/v1/key/list/");
}

fn api_err<T: std::fmt::Debug>(r: Result<T, ClientError>) -> KesError {
    r.unwrap_err().api().cloned().unwrap()
}

/// Every typed error of kms-go (`kes/error.go`) kesh can produce, compared the kms-go way (status + message).
pub(super) async fn typed_errors_round_trip(store: Store) {
    let (creds, id) = client_cert(&rcgen::PKCS_ED25519);
    let srv = server()
        .store(store)
        .policy(TestPolicy::allowing("none", &[], [id]))
        .start()
        .await;
    let c = srv.admin();
    let k = name("typed");
    c.create_key(&k).await.unwrap();
    assert_eq!(api_err(c.create_key(&k).await), errors::KEY_EXISTS);
    assert_eq!(
        api_err(c.describe_key("missing-key").await),
        errors::KEY_NOT_FOUND
    );
    let ct = c.encrypt(&k, b"x", b"a").await.unwrap();
    assert_eq!(
        api_err(c.decrypt(&k, &ct, b"b").await.map(drop)),
        errors::DECRYPT
    );
    assert_eq!(
        api_err(c.describe_policy("missing").await),
        errors::POLICY_NOT_FOUND
    );
    assert_eq!(
        api_err(c.read_policy("missing").await),
        errors::POLICY_NOT_FOUND
    );
    assert_eq!(
        api_err(c.describe_identity(&"f".repeat(64)).await),
        errors::IDENTITY_NOT_FOUND
    );
    let other = srv.client(creds);
    assert_eq!(
        api_err(other.create_key(&name("typed")).await),
        errors::NOT_ALLOWED
    );
    assert_eq!(api_err(other.list_keys("").await), errors::NOT_ALLOWED);
    // A typed error never matches another status or message.
    assert_ne!(errors::KEY_NOT_FOUND, errors::POLICY_NOT_FOUND);
    assert_ne!(errors::KEY_EXISTS, KesError::new(409, "key already exists"));
}

/// A keystore that fails in the ways an HSM can, to check the 5xx mapping and the error log.
struct Failing {
    status: Result<Duration, KeystoreError>,
}

#[async_trait::async_trait]
impl KeyStore for Failing {
    fn description(&self) -> String {
        "failing test keystore".into()
    }
    async fn create(&self, name: &KeyName, _: Provenance) -> Result<(), KeystoreError> {
        Err(fail(name))
    }
    async fn import(&self, name: &KeyName, _: ImportKey) -> Result<(), KeystoreError> {
        Err(fail(name))
    }
    async fn describe(&self, name: &KeyName) -> Result<KeyInfo, KeystoreError> {
        Err(fail(name))
    }
    async fn list(&self, _: &str) -> Result<Vec<KeyName>, KeystoreError> {
        Err(KeystoreError::Backend("CKR_DEVICE_ERROR".into()))
    }
    async fn delete(&self, name: &KeyName) -> Result<(), KeystoreError> {
        Err(fail(name))
    }
    async fn generate(&self, name: &KeyName, _: &[u8]) -> Result<DataKey, KeystoreError> {
        Err(fail(name))
    }
    async fn encrypt(&self, name: &KeyName, _: &[u8], _: &[u8]) -> Result<Vec<u8>, KeystoreError> {
        Err(fail(name))
    }
    async fn decrypt(
        &self,
        name: &KeyName,
        _: &[u8],
        _: &[u8],
    ) -> Result<SecretBytes, KeystoreError> {
        Err(fail(name))
    }
    async fn hmac(&self, name: &KeyName, _: &[u8]) -> Result<[u8; 32], KeystoreError> {
        Err(fail(name))
    }
    async fn status(&self) -> Result<Duration, KeystoreError> {
        self.status.clone()
    }
}

/// The failure is chosen by the key name.
fn fail(name: &KeyName) -> KeystoreError {
    match name.as_str() {
        "busy" => KeystoreError::Busy(Duration::from_secs(2)),
        "down" => KeystoreError::Unreachable("token not present".into()),
        "nohmac" => KeystoreError::HmacUnsupported,
        "chacha" => KeystoreError::AlgorithmUnsupported("ChaCha20"),
        _ => KeystoreError::Backend("CKR_DEVICE_ERROR".into()),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keystore_failures_map_to_5xx_and_reach_the_error_log() {
    let ks = Arc::new(Failing {
        status: Err(KeystoreError::Unreachable("token not present".into())),
    });
    let srv = server().keystore(ks).start().await;
    let c = srv.admin();
    let mut errors_stream = c.stream("/v1/log/error").await.unwrap();

    let r = send(&c, Method::POST, "/v1/key/generate/busy", Some(b"{}")).await;
    assert_error(&r, 503, "key store is busy");
    assert_eq!(r.headers["retry-after"], "1");
    const EMPTY: Option<&[u8]> = Some(b"{}");
    for (method, path, body, status, message) in [
        (
            Method::POST,
            "/v1/key/generate/down",
            EMPTY,
            504,
            "key store is not reachable",
        ),
        (
            Method::POST,
            "/v1/key/generate/k",
            EMPTY,
            500,
            "failed to generate encryption key",
        ),
        (
            Method::POST,
            "/v1/key/encrypt/k",
            EMPTY,
            500,
            "failed to encrypt plaintext",
        ),
        (
            Method::POST,
            "/v1/key/decrypt/k",
            EMPTY,
            500,
            "failed to decrypt ciphertext",
        ),
        (
            Method::POST,
            "/v1/key/create/k",
            None,
            502,
            "failed to create key",
        ),
        (
            Method::GET,
            "/v1/key/describe/k",
            None,
            502,
            "failed to read key",
        ),
        (
            Method::DELETE,
            "/v1/key/delete/k",
            None,
            502,
            "failed to delete key",
        ),
        (
            Method::GET,
            "/v1/key/list/",
            None,
            502,
            "failed to list keys",
        ),
        (
            Method::PUT,
            "/v1/key/hmac/nohmac",
            EMPTY,
            409,
            "key does not support HMAC",
        ),
    ] {
        assert_request_error(&c, method, path, body, status, message).await;
    }
    let body = format!(
        "{{\"key\":\"{}\",\"cipher\":\"ChaCha20\"}}",
        b64e(&[1u8; 32])
    );
    assert_request_error(
        &c,
        Method::POST,
        "/v1/key/import/chacha",
        Some(body.as_bytes()),
        406,
        "algorithm 'ChaCha20' is not supported",
    )
    .await;

    // Unreachable keystore: ready is 504, status reports it the way KES does.
    assert_request_error(
        &c,
        Method::GET,
        "/v1/ready",
        None,
        504,
        "key store is not reachable",
    )
    .await;
    let s: serde_json::Value = json(&send(&c, Method::GET, "/v1/status", None).await);
    assert_eq!(s["keystore_unreachable"], true);
    assert!(s.get("keystore_latency").is_none() && s.get("keystore_unavailable").is_none());

    let line = harness::http::next_line(&mut errors_stream).await;
    let e: api::ErrorEvent = serde_json::from_slice(&line).unwrap();
    assert!(
        e.message.contains("level=ERROR") && e.message.contains("key store is busy"),
        "{}",
        e.message
    );
    assert!(
        e.message.contains("req.path=/v1/key/generate/busy"),
        "{}",
        e.message
    );

    let ks = Arc::new(Failing {
        status: Err(KeystoreError::Backend("CKR_GENERAL_ERROR".into())),
    });
    let srv = server().keystore(ks).start().await;
    assert_request_error(
        &srv.admin(),
        Method::GET,
        "/v1/ready",
        None,
        502,
        "key store is unavailable",
    )
    .await;
}

/// The soft keystore with a misbehaving `generate`.
struct Misbehaving(kesh::keystore::soft::SoftKeyStore, OnGenerate);

enum OnGenerate {
    Sleep(Duration),
    Panic,
}

#[async_trait::async_trait]
impl KeyStore for Misbehaving {
    fn description(&self) -> String {
        "misbehaving test keystore".into()
    }
    async fn create(&self, name: &KeyName, p: Provenance) -> Result<(), KeystoreError> {
        self.0.create(name, p).await
    }
    async fn import(&self, name: &KeyName, k: ImportKey) -> Result<(), KeystoreError> {
        self.0.import(name, k).await
    }
    async fn describe(&self, name: &KeyName) -> Result<KeyInfo, KeystoreError> {
        self.0.describe(name).await
    }
    async fn list(&self, prefix: &str) -> Result<Vec<KeyName>, KeystoreError> {
        self.0.list(prefix).await
    }
    async fn delete(&self, name: &KeyName) -> Result<(), KeystoreError> {
        self.0.delete(name).await
    }
    async fn generate(&self, name: &KeyName, context: &[u8]) -> Result<DataKey, KeystoreError> {
        match self.1 {
            OnGenerate::Sleep(d) => tokio::time::sleep(d).await,
            OnGenerate::Panic => panic!("a bug in a handler"),
        }
        self.0.generate(name, context).await
    }
    async fn encrypt(&self, name: &KeyName, p: &[u8], c: &[u8]) -> Result<Vec<u8>, KeystoreError> {
        self.0.encrypt(name, p, c).await
    }
    async fn decrypt(
        &self,
        name: &KeyName,
        ct: &[u8],
        c: &[u8],
    ) -> Result<SecretBytes, KeystoreError> {
        self.0.decrypt(name, ct, c).await
    }
    async fn hmac(&self, name: &KeyName, m: &[u8]) -> Result<[u8; 32], KeystoreError> {
        self.0.hmac(name, m).await
    }
    async fn status(&self) -> Result<Duration, KeystoreError> {
        self.0.status().await
    }
}

/// Past its deadline a request gets no status: the stream is reset, as in KES.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn route_deadline_aborts_the_request() {
    let ks = Arc::new(Misbehaving(
        kesh::keystore::soft::SoftKeyStore::in_memory(),
        OnGenerate::Sleep(Duration::from_secs(3)),
    ));
    let srv = server()
        .keystore(ks)
        .route("/v1/key/generate/", false, Some(Duration::from_millis(300)))
        .start()
        .await;
    let c = srv.admin();
    c.create_key("slow").await.unwrap();
    let start = Instant::now();
    match c.generate_key("slow", b"").await {
        Err(ClientError::Connect(_)) => {}
        other => panic!("expected an aborted request, got {other:?}"),
    }
    assert!(
        start.elapsed() < Duration::from_secs(2),
        "{:?}",
        start.elapsed()
    );
    // The server keeps serving, and the aborted request is on the audit trail.
    c.describe_key("slow").await.unwrap();
    let mut audit = c.stream("/v1/log/audit").await.unwrap();
    let _ = c.generate_key("slow", b"").await;
    let line = harness::http::next_line(&mut audit).await;
    let event: api::AuditEvent = serde_json::from_slice(&line).unwrap();
    assert_eq!(
        (event.request.path.as_str(), event.response.code),
        ("/v1/key/generate/slow", 504)
    );
}

/// A panic in a handler costs that request a 500; the connection and the server live on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_handler_answers_500_and_the_server_lives_on() {
    let ks = Arc::new(Misbehaving(
        kesh::keystore::soft::SoftKeyStore::in_memory(),
        OnGenerate::Panic,
    ));
    let srv = server().keystore(ks).start().await;
    let c = srv.admin();
    c.create_key("boom").await.unwrap();
    let r = send(&c, Method::POST, "/v1/key/generate/boom", Some(b"{}")).await;
    assert_error(&r, 500, "internal server error");
    c.describe_key("boom").await.unwrap();
    c.status().await.unwrap();
}
