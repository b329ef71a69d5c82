//! The KES HTTP API through the front door: a real server on loopback port 0, real mTLS with
//! certificates generated at test time, every route, run on the soft keystore, on SoftHSM and on Kryoptic.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Method, StatusCode};
use kesh::api;
use kesh::client::{errors, Client, ClientError, Credentials, KesError, RawResponse, ServerTrust};
use kesh::config::server::{RouteOverride, ServerConfig};
use kesh::identity::{ApiKey, Identity};
use kesh::keystore::{DataKey, ImportKey, KeyInfo, KeyStore, KeystoreError, Provenance};
use kesh::name::KeyName;
use kesh::secret::SecretBytes;
use kesh::server::audit::{AuditLog, ErrorLog};
use kesh::server::metrics::Metrics;
use kesh::server::policy::{Authorizer, Policy, PolicyEntry, PolicyName};
use kesh::server::routes::RouteSettings;
use kesh::server::service::Service;
use kesh::server::tls::ClientAuth;
use kesh::server::{Server, ServerHandle, ServerParts};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use time::OffsetDateTime;

use crate::harness::{self, b64, b64e, Store};

mod security;

crate::on_every_keystore!(
    key_lifecycle,
    request_errors_and_limits,
    import_kes_key_and_decrypt_kes_ciphertexts,
    minio_startup_and_key_status,
    typed_errors_round_trip,
    client_certificate_types,
    policy_matrix,
    policy_and_identity_routes,
    status_metrics_api_version,
    audit_stream_delivers,
);

/// A test-only RSA-2048 key (RSA key generation is not available through ring); the
/// certificate around it is made at test time.
const RSA_KEY: &str = "-----BEGIN PRIVATE KEY-----
MIIEvQIBADANBgkqhkiG9w0BAQEFAASCBKcwggSjAgEAAoIBAQCm4ZBFiSZEzj3F
iB3gEITcJ3egaO8s9TCcmk2FuC+iprxotOXaw4usQ+zyvtsSkYcAp4GXW1OlBZz2
fGv2K4R9EkY6b1wl+GUm+asN5xpsqfqMMlM6+D+/zXR9gn7d4W0EJ6FtghxBIFpt
P0j2UHMh/JwwvEQEy74UuPckU06yWylcXJaenPvXZdEXIg5cwXnRTrBiGMJoXkHz
P9g0543EZzW7E2jD2LmAh4JmjU23g5rTZu4ERfiBslwg3EaOQJW36Fefdy8DVbcD
iTdYLpIablr9xnlIf9AkdMeByOP92BvtAJkwhSYSQHTy5yUkoXAxMDCcUT1jHFFb
EkMw4t2jAgMBAAECggEASRabWEkUEKh/V2chJoQ1nDJQ61lp/ze3va666yja/BKo
i/dGgESKhL0PJtW+HujLxtaWJFMkVC8cKrwdkKhIk3qQdYFWS2755lMMvr8LzLG5
gPN9jmMxkHCMZ3fi1oyncV1mDw8gDsn7sMM50l8zvZvkUFf0NmGBc5P68dbmragY
XIr60DkWr/8hIk/FLTsxqV42iJwd6Yn0UfkVu60Cn2q1XYn0eXU6LpE/Iy+2GAFb
fBVshGaQFw0/kgh6k8pSMirbcCxpng5lL0csBT71sOryK9aRREEMgwRMoa6WpwYw
AawVoYhD4jLl+WtufmZWRdTR76jUpnivBPKzH6ZTaQKBgQDUUcEg+a30s9iwNVXm
vjtu2Rgn4qEvWuTEqXpulivX1ECakqOhewr9yRbigdX9f4P7us0UuHoLXDfqQcpX
x2CPdKbUGkz/DSs01eQAs5xvpLRsfxJxDobPvXYWt+etcK5ucFAnNuHJRjysDQuF
/rqcXCEdd1Y4yFu3SqelJ4DbxQKBgQDJNrVUhseZHT0CMCRnOFhVlJAdpE4tUUcH
AYh7KCP6rm7lXHnJDjoOjrHHrUlJdfIEBxXDVtivWb/GZwed830NHfTb7KAtfut8
NuZofK040hpV5NzsqyarJ5U+xzF0JiRFxSVTN5lOoSlJjPNNXOyObHT1ML8mwJw3
laiqabriRwKBgHtMmvZ2aOJBiyYRYzhj4wnlgxSulOJ2S4I11cbg6McnGPlrDSGa
3fAx1ltmAQp9Af2vJqfQ1fdA76vX1xUQ0O+eU7+7Ilm/oQbG6+jIZaGkKa8UQHZt
dDayFSDuXdmoJXQ3PyT2xzpm0pcr4DRJkL969TQyeFzzZefUr/TGMxvtAoGBAKN3
4ctBEElxeo4bhIejPAiTAJ5ETQr+HCEx+qpriwduzUNjZMGV4E7RWNdrDb4zpyHk
i6a+GJ4k4OuT6plFJpQQgUxmqh8sHK42f+vlVmlyL9kWbPGNfoXQS6zL8X52OkPA
jblU0yURQ1SwwT1ZwAlZTY+hQbp/AqsZ2ARSj3SjAoGAE5EgDjxYgSYMXmB0WoqL
xZQNfWmEKT9/La3KlFOQAzNXmG7vIaiueXMjpiosL74seSRso6M/ESkYYIuGYcIO
snU6qBvvR8Ew2deu0O2calT+X71Ll5Z6JhwBHwxqoPmmTAUss7ZSYJGhtwsk/mLH
K1mI6SpVssosfrxPocI8AZE=
-----END PRIVATE KEY-----";

/// Certificates for one server: a CA and a leaf for 127.0.0.1 signed by it.
struct ServerCerts {
    ca: CertificateDer<'static>,
    chain: Vec<CertificateDer<'static>>,
    key_pem: String,
    cert_pem: String,
}

fn server_certs() -> ServerCerts {
    let ca_key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "kesh test CA");
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let params =
        rcgen::CertificateParams::new(vec!["127.0.0.1".to_owned(), "localhost".to_owned()])
            .unwrap();
    let leaf = params.signed_by(&key, &ca, &ca_key).unwrap();
    ServerCerts {
        ca: ca.der().clone(),
        chain: vec![leaf.der().clone()],
        key_pem: key.serialize_pem(),
        cert_pem: leaf.pem(),
    }
}

/// A client certificate of the given algorithm; returns its credentials and identity.
fn client_cert(alg: &'static rcgen::SignatureAlgorithm) -> (Credentials, Identity) {
    let key = if alg == &rcgen::PKCS_RSA_SHA256 {
        rcgen::KeyPair::from_pkcs8_pem_and_sign_algo(RSA_KEY, alg).unwrap()
    } else {
        rcgen::KeyPair::generate_for(alg).unwrap()
    };
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "client");
    let cert = params.self_signed(&key).unwrap();
    let identity = Identity::from_certificate(cert.der()).unwrap();
    let creds = Credentials::Certificate {
        chain: vec![cert.der().clone()],
        key: PrivateKeyDer::try_from(key.serialize_der()).unwrap(),
    };
    (creds, identity)
}

/// One policy for [`TestServer::start`].
struct TestPolicy {
    name: &'static str,
    allow: Vec<&'static str>,
    deny: Vec<&'static str>,
    identities: Vec<Identity>,
}

fn authorizer(admin: &Identity, policies: &[TestPolicy]) -> Authorizer {
    let mut map = BTreeMap::new();
    for p in policies {
        map.insert(
            PolicyName::new(p.name).unwrap(),
            PolicyEntry {
                policy: Policy {
                    allow: p.allow.iter().map(|s| s.to_string()).collect(),
                    deny: p.deny.iter().map(|s| s.to_string()).collect(),
                },
                identities: p.identities.clone(),
            },
        );
    }
    Authorizer::new(admin.clone(), map, OffsetDateTime::now_utc()).unwrap()
}

/// A running server on 127.0.0.1:0; shut down on drop.
struct TestServer {
    addr: SocketAddr,
    handle: ServerHandle,
    certs: ServerCerts,
    admin: ApiKey,
    _store: Option<Store>,
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.handle.shutdown();
    }
}

impl TestServer {
    async fn start(store: Store, policies: &[TestPolicy]) -> Self {
        let ks = store.ks.clone();
        Self::start_with(ks, Some(store), policies, &BTreeMap::new()).await
    }

    async fn start_with(
        ks: Arc<dyn KeyStore>,
        store: Option<Store>,
        policies: &[TestPolicy],
        api: &BTreeMap<String, RouteOverride>,
    ) -> Self {
        Self::start_full(ks, store, policies, api, ClientAuth::AnyCertificate).await
    }

    async fn start_full(
        ks: Arc<dyn KeyStore>,
        store: Option<Store>,
        policies: &[TestPolicy],
        api: &BTreeMap<String, RouteOverride>,
        client_auth: ClientAuth,
    ) -> Self {
        Self::start_limited(
            ks,
            store,
            policies,
            api,
            client_auth,
            kesh::server::DEFAULT_MAX_CONNECTIONS,
        )
        .await
    }

    async fn start_limited(
        ks: Arc<dyn KeyStore>,
        store: Option<Store>,
        policies: &[TestPolicy],
        api: &BTreeMap<String, RouteOverride>,
        client_auth: ClientAuth,
        max_connections: usize,
    ) -> Self {
        let admin = ApiKey::generate().unwrap();
        let certs = server_certs();
        let metrics = Arc::new(Metrics::new());
        let routes = RouteSettings::new(api);
        let service = Arc::new(Service::new(
            ks,
            authorizer(&admin.identity(), policies),
            metrics.clone(),
        ));
        let key = PrivateKeyDer::from_pem_slice(certs.key_pem.as_bytes()).unwrap();
        let tls = kesh::server::tls::server_config(
            certs.chain.clone(),
            key,
            &client_auth,
            !routes.any_skip_auth(),
        )
        .unwrap();
        let parts = ServerParts {
            service,
            tls,
            routes,
            audit: AuditLog::new(metrics.clone(), false),
            errors: ErrorLog::new(metrics, true),
        };
        let server = Server::bind("127.0.0.1:0".parse().unwrap(), parts)
            .await
            .unwrap()
            .with_max_connections(max_connections);
        let addr = server.local_addr().unwrap();
        let handle = server.handle();
        tokio::spawn(server.run());
        TestServer {
            addr,
            handle,
            certs,
            admin,
            _store: store,
        }
    }

    fn client(&self, creds: Credentials) -> Client {
        Client::new(
            &self.addr.to_string(),
            creds,
            ServerTrust::Roots(vec![self.certs.ca.clone()]),
        )
        .unwrap()
    }

    fn admin(&self) -> Client {
        self.client(Credentials::ApiKey(
            ApiKey::parse(&self.admin.expose_text()).unwrap(),
        ))
    }

    fn admin_id(&self) -> String {
        self.admin.identity().to_string()
    }
}

use rustls::pki_types::pem::PemObject as _;

async fn send(c: &Client, method: Method, path: &str, body: Option<&[u8]>) -> RawResponse {
    c.send(method, path, body.map(Bytes::copy_from_slice), None)
        .await
        .unwrap()
}

/// Asserts the exact KES error response.
fn assert_error(r: &RawResponse, status: u16, message: &str) {
    assert_eq!(
        r.status.as_u16(),
        status,
        "body: {:?}",
        String::from_utf8_lossy(&r.body)
    );
    assert_eq!(r.headers["content-type"], "application/json");
    let expected = format!(
        "{{\"message\":{}\n}}",
        serde_json::to_string(message).unwrap()
    );
    assert_eq!(String::from_utf8_lossy(&r.body), expected);
}

fn assert_empty_ok(r: &RawResponse) {
    assert_eq!(
        r.status,
        StatusCode::OK,
        "body: {:?}",
        String::from_utf8_lossy(&r.body)
    );
    assert!(r.body.is_empty());
    assert!(r.headers.get("content-type").is_none());
}

fn json<T: serde::de::DeserializeOwned>(r: &RawResponse) -> T {
    assert_eq!(
        r.status,
        StatusCode::OK,
        "body: {:?}",
        String::from_utf8_lossy(&r.body)
    );
    assert_eq!(r.headers["content-type"], "application/json");
    assert!(r.body.ends_with(b"\n"));
    serde_json::from_slice(&r.body).unwrap()
}

fn name(hint: &str) -> String {
    harness::name(hint).to_string()
}

async fn key_lifecycle(store: Store) {
    let srv = TestServer::start(store, &[]).await;
    let c = srv.admin();
    let k = name("life");

    // PUT and POST both create; a second create is the typed "exists" error.
    assert_empty_ok(&send(&c, Method::PUT, &format!("/v1/key/create/{k}"), None).await);
    let again = send(&c, Method::POST, &format!("/v1/key/create/{k}"), None).await;
    assert_error(&again, 400, "key already exists");
    let k2 = name("life");
    assert_empty_ok(&send(&c, Method::POST, &format!("/v1/key/create/{k2}"), None).await);

    let d: api::DescribeKeyResponse =
        json(&send(&c, Method::GET, &format!("/v1/key/describe/{k}"), None).await);
    assert_eq!(d.name, k);
    assert_eq!(d.algorithm, "AES256");
    assert_eq!(d.created_by, srv.admin_id());
    assert!(
        (OffsetDateTime::now_utc() - d.created_at)
            .whole_seconds()
            .abs()
            < 60
    );

    // Listing: slash-less (MinIO's `*`), `%2A`, the empty prefix, a literal prefix and `abc*`.
    let prefix = k
        .rsplit_once('-')
        .unwrap()
        .0
        .rsplit_once('-')
        .unwrap()
        .0
        .to_owned();
    for path in [
        "/v1/key/list".to_owned(),
        "/v1/key/list/".into(),
        "/v1/key/list/%2A".into(),
        format!("/v1/key/list/{prefix}"),
        format!("/v1/key/list/{prefix}*"),
    ] {
        let l: api::ListKeysResponse = json(&send(&c, Method::GET, &path, None).await);
        assert!(
            l.names.contains(&k) && l.names.contains(&k2),
            "{path}: {:?}",
            l.names
        );
        let mut sorted = l.names.clone();
        sorted.sort();
        assert_eq!(l.names, sorted);
        assert!(l.continue_at.is_empty());
    }
    let none: api::ListKeysResponse =
        json(&send(&c, Method::GET, "/v1/key/list/zzz-none*", None).await);
    assert_eq!(none.names, Vec::<String>::new());
    let raw = send(&c, Method::GET, "/v1/key/list/zzz-none", None).await;
    assert_eq!(&raw.body[..], b"{\"names\":[]}\n");

    // Generate → decrypt with the same context; a different context is not authentic.
    let g: api::GenerateKeyResponse = json(
        &send(
            &c,
            Method::POST,
            &format!("/v1/key/generate/{k}"),
            Some(format!("{{\"context\":\"{}\"}}", b64e(b"ctx")).as_bytes()),
        )
        .await,
    );
    assert_eq!(g.plaintext.0.len(), 32);
    let dec = format!(
        "{{\"ciphertext\":\"{}\",\"context\":\"{}\"}}",
        b64e(&g.ciphertext.0),
        b64e(b"ctx")
    );
    let p: api::DecryptKeyResponse = json(
        &send(
            &c,
            Method::PUT,
            &format!("/v1/key/decrypt/{k}"),
            Some(dec.as_bytes()),
        )
        .await,
    );
    assert_eq!(*p.plaintext.0, *g.plaintext.0);
    let wrong = format!(
        "{{\"ciphertext\":\"{}\",\"context\":\"{}\"}}",
        b64e(&g.ciphertext.0),
        b64e(b"other")
    );
    assert_error(
        &send(
            &c,
            Method::POST,
            &format!("/v1/key/decrypt/{k}"),
            Some(wrong.as_bytes()),
        )
        .await,
        400,
        "decryption failed: ciphertext is not authentic",
    );
    let other_key = format!(
        "{{\"ciphertext\":\"{}\",\"context\":\"{}\"}}",
        b64e(&g.ciphertext.0),
        b64e(b"ctx")
    );
    assert_error(
        &send(
            &c,
            Method::POST,
            &format!("/v1/key/decrypt/{k2}"),
            Some(other_key.as_bytes()),
        )
        .await,
        400,
        "decryption failed: ciphertext is not authentic",
    );

    // Encrypt → decrypt, through the typed client too.
    let ct = c.encrypt(&k, b"hello kesh", b"").await.unwrap();
    assert_eq!(&**c.decrypt(&k, &ct, b"").await.unwrap().0, b"hello kesh");
    let e: api::EncryptKeyResponse = json(
        &send(
            &c,
            Method::PUT,
            &format!("/v1/key/encrypt/{k}"),
            Some(format!("{{\"plaintext\":\"{}\"}}", b64e(b"x")).as_bytes()),
        )
        .await,
    );
    assert!(!e.ciphertext.0.is_empty());

    // HMAC: 32 bytes, deterministic per key, different across keys.
    let m1 = c.hmac(&k, b"root access key").await.unwrap();
    assert_eq!(m1.len(), 32);
    assert_eq!(m1, c.hmac(&k, b"root access key").await.unwrap());
    assert_ne!(m1, c.hmac(&k2, b"root access key").await.unwrap());
    assert_ne!(m1, c.hmac(&k, b"root secret key").await.unwrap());

    // Delete, then everything about the key is 404.
    assert_empty_ok(&send(&c, Method::DELETE, &format!("/v1/key/delete/{k}"), None).await);
    assert_error(
        &send(&c, Method::DELETE, &format!("/v1/key/delete/{k}"), None).await,
        404,
        "key does not exist",
    );
    assert_error(
        &send(&c, Method::GET, &format!("/v1/key/describe/{k}"), None).await,
        404,
        "key does not exist",
    );
    assert_error(
        &send(
            &c,
            Method::POST,
            &format!("/v1/key/generate/{k}"),
            Some(b"{}"),
        )
        .await,
        404,
        "key does not exist",
    );
    assert_error(
        &send(
            &c,
            Method::POST,
            &format!("/v1/key/encrypt/{k}"),
            Some(b"{}"),
        )
        .await,
        404,
        "key does not exist",
    );
    assert_error(
        &send(
            &c,
            Method::POST,
            &format!("/v1/key/decrypt/{k}"),
            Some(dec.as_bytes()),
        )
        .await,
        404,
        "key does not exist",
    );
    assert_error(
        &send(&c, Method::PUT, &format!("/v1/key/hmac/{k}"), Some(b"{}")).await,
        404,
        "key does not exist",
    );
    let l: api::ListKeysResponse = json(&send(&c, Method::GET, "/v1/key/list", None).await);
    assert!(!l.names.contains(&k) && l.names.contains(&k2));
}

async fn request_errors_and_limits(store: Store) {
    let srv = TestServer::start(store, &[]).await;
    let c = srv.admin();
    let k = name("errs");
    c.create_key(&k).await.unwrap();

    // Invalid names and patterns, decoded from the path first.
    assert_error(
        &send(&c, Method::POST, "/v1/key/create/my.key", None).await,
        400,
        "key name 'my.key' is empty, too long or contains invalid characters",
    );
    assert_error(
        &send(&c, Method::POST, "/v1/key/create/", None).await,
        400,
        "key name '' is empty, too long or contains invalid characters",
    );
    assert_error(
        &send(&c, Method::POST, "/v1/key/create/a%2Fb", None).await,
        400,
        "key name 'a/b' is empty, too long or contains invalid characters",
    );
    let long = "a".repeat(81);
    assert_error(
        &send(&c, Method::GET, &format!("/v1/key/describe/{long}"), None).await,
        400,
        &format!("key name '{long}' is empty, too long or contains invalid characters"),
    );
    assert_error(
        &send(&c, Method::GET, "/v1/key/list/*-*", None).await,
        400,
        "listing pattern '*-*' is empty, too long or is invalid",
    );
    assert_error(
        &send(&c, Method::GET, "/v1/key/list/_", None).await,
        400,
        "listing pattern '_' is empty, too long or is invalid",
    );
    assert_error(
        &send(&c, Method::GET, "/v1/policy/describe/a.b", None).await,
        400,
        "policy name 'a.b' is empty, too long or contains invalid characters",
    );
    assert_error(
        &send(&c, Method::GET, "/v1/identity/describe/a.b", None).await,
        400,
        "identity 'a.b' is empty, too long or contains invalid characters",
    );

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
        assert_error(
            &send(&c, Method::POST, &gen, Some(bad)).await,
            400,
            "invalid request body",
        );
    }
    assert_error(
        &send(&c, Method::POST, &format!("/v1/key/encrypt/{k}"), Some(b"")).await,
        400,
        "invalid request body",
    );
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
    assert_error(
        &send(&c, Method::POST, &gen, Some(over.as_bytes())).await,
        400,
        "invalid request body",
    );
    assert_error(
        &send(
            &c,
            Method::POST,
            &format!("/v1/key/import/{}", name("imp")),
            Some(over.as_bytes()),
        )
        .await,
        400,
        "invalid import key request body",
    );

    // The name is checked before the body is read.
    assert_error(
        &send(
            &c,
            Method::POST,
            "/v1/key/import/a.b",
            Some(over.as_bytes()),
        )
        .await,
        400,
        "key name 'a.b' is empty, too long or contains invalid characters",
    );

    // Import: body, cipher (checked first), then size.
    let imp = format!("/v1/key/import/{}", name("imp"));
    assert_error(
        &send(&c, Method::POST, &imp, Some(b"{\"key\":\"!!\"}")).await,
        400,
        "invalid import key request body",
    );
    let key32 = b64e(&[7u8; 32]);
    assert_error(
        &send(
            &c,
            Method::POST,
            &imp,
            Some(format!("{{\"key\":\"{key32}\",\"cipher\":\"AES\"}}").as_bytes()),
        )
        .await,
        406,
        "algorithm 'AES' is not supported",
    );
    assert_error(
        &send(
            &c,
            Method::POST,
            &imp,
            Some(format!("{{\"key\":\"{key32}\"}}").as_bytes()),
        )
        .await,
        406,
        "algorithm '' is not supported",
    );
    assert_error(
        &send(
            &c,
            Method::POST,
            &imp,
            Some(format!("{{\"key\":\"{}\",\"cipher\":\"AES256\"}}", b64e(&[7u8; 16])).as_bytes()),
        )
        .await,
        406,
        "invalid key size for 'AES256'",
    );
    assert_error(
        &send(
            &c,
            Method::POST,
            &format!("/v1/key/import/{k}"),
            Some(format!("{{\"key\":\"{key32}\",\"cipher\":\"AES256\"}}").as_bytes()),
        )
        .await,
        400,
        "key already exists",
    );

    // Methods: wrong method is 405 with `Accept`; HEAD is not GET; POST is fine on PUT routes.
    let r = send(&c, Method::GET, &format!("/v1/key/create/{k}"), None).await;
    assert_error(&r, 405, "received method 'GET' expected 'PUT'");
    assert_eq!(r.headers["accept"], "PUT");
    assert_error(
        &send(&c, Method::POST, "/v1/key/list/", None).await,
        405,
        "received method 'POST' expected 'GET'",
    );
    assert_error(
        &send(&c, Method::PUT, &format!("/v1/key/delete/{k}"), None).await,
        405,
        "received method 'PUT' expected 'DELETE'",
    );
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

/// §7.5 vectors: a key imported as KES had it decrypts KES ciphertexts, current and legacy.
async fn import_kes_key_and_decrypt_kes_ciphertexts(store: Store) {
    let srv = TestServer::start(store, &[]).await;
    let c = srv.admin();
    let k = name("kesimp");
    c.import_key(
        &k,
        &b64("dDHbTWgo+Yh3u804SYB5OyVMy6RiLeJYBQth1f6KlEU="),
        "AES256",
    )
    .await
    .unwrap();
    let d = c.describe_key(&k).await.unwrap();
    assert_eq!(d.algorithm, "AES256");
    let ct = b64("s2gmfQHeGdlyL8x1yEWSACUV3GrSoz3t160hugMgzKWgyqesXDVUJ5Dw5Mt076rR1PNiU9X4YjLH14D8a81t2r2xsz4gVZac");
    let pt = c.decrypt(&k, &ct, &[0u8; 16]).await.unwrap();
    assert_eq!(*pt.0, b64("CLcJoykFCWZDkEIiUq9bJRqwCwW9ZDvdgu8EMA=="));
    assert_eq!(
        c.decrypt(&k, &ct, b"").await.unwrap_err().api(),
        Some(&errors::DECRYPT)
    );

    let zero = name("kesimp0");
    c.import_key(&zero, &[0u8; 32], "AES256-GCM_SHA256")
        .await
        .unwrap();
    for legacy in [
        b"{\"aead\":\"AES-256-GCM-HMAC-SHA-256\",\"iv\":\"xLxIN3tSCkg2xMafuvwUwg==\",\"nonce\":\"gu0mGwUkwcvMEoi5\",\"bytes\":\"WVgRjeIJm3w50C/l+y7y2i6mbNg5NCAqN1zvOYWZKmc=\"}".to_vec(),
        b64("lbFBRVMyNTYtR0NNX1NIQTI1NtkgNjY2ODdhYWRmODYyYmQ3NzZjOGZjMThiOGU5ZjhlMjDEEExv7LAd4oz0SaHZrX5LBufEDEKME1ow1CDfUFrqv8QgJuy7Sw+jVqz99TK1HV851LT3K4mwwDv46TB2ngWkAJQ="),
        b64("zwdDgHeRlIFRnJ7+DIhs/ka7GFK2CFSfDELqg1VCyTQzZ58o7MAdupMLk3ZjlMo2ZUDwldL2o41nAWDc"),
    ] {
        assert_eq!(*c.decrypt(&zero, &legacy, b"").await.unwrap().0, vec![0u8; 16]);
    }
    // A data key generated under an imported key is in KES's format: 76 bytes.
    let g = c.generate_key(&zero, b"{}").await.unwrap();
    assert_eq!(g.plaintext.0.len(), 32);
    assert_eq!(g.ciphertext.0.len(), 76);
}

/// §8.2 and §8.4: what MinIO does at start-up and for `mc admin kms key status`.
async fn minio_startup_and_key_status(store: Store) {
    let srv = TestServer::start(store, &[]).await;
    let c = srv.admin();
    let k = name("minio-default");
    let _ = c.describe_key(&k).await;
    let ctx = b"{}";
    match c.generate_key(&k, ctx).await {
        Err(e) if e.api() == Some(&errors::KEY_NOT_FOUND) => {}
        other => panic!("expected ErrKeyNotFound, got {other:?}"),
    }
    // Several MinIO nodes start at once: one create wins, the others see ErrKeyExists.
    let results = futures_util::future::join_all((0..4).map(|_| c.create_key(&k))).await;
    assert_eq!(
        results.iter().filter(|r| r.is_ok()).count(),
        1,
        "{results:?}"
    );
    for r in results.iter().filter_map(|r| r.as_ref().err()) {
        assert_eq!(r.api(), Some(&errors::KEY_EXISTS));
    }
    let g = c.generate_key(&k, ctx).await.unwrap();
    assert_eq!(g.plaintext.0.len(), 32);
    c.status().await.unwrap();

    // mc admin kms key status
    let ctx = br#"{"MinIO admin API":"KMSKeyStatusHandler"}"#;
    let g = c.generate_key(&k, ctx).await.unwrap();
    assert_eq!(
        *c.decrypt(&k, &g.ciphertext.0, ctx).await.unwrap().0,
        *g.plaintext.0
    );
    // The readiness probe: generate on every probe.
    c.generate_key(&k, br#"{"healthcheck":""}"#).await.unwrap();
}

fn api_err<T: std::fmt::Debug>(r: Result<T, ClientError>) -> KesError {
    r.unwrap_err().api().cloned().unwrap()
}

/// Every typed error of §9.1 kesh can produce, compared the kms-go way (status + message).
async fn typed_errors_round_trip(store: Store) {
    let (creds, id) = client_cert(&rcgen::PKCS_ED25519);
    let srv = TestServer::start(
        store,
        &[TestPolicy {
            name: "none",
            allow: vec![],
            deny: vec![],
            identities: vec![id],
        }],
    )
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

/// Ed25519 (MinIO's API keys), ECDSA P-256/P-384 and RSA client certificates all work, each
/// identity is the SPKI hash, and unknown identities get 403.
async fn client_certificate_types(store: Store) {
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
    let srv = TestServer::start(store, &policies).await;
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
    assert_error(
        &send(&u, Method::GET, "/v1/key/list/", None).await,
        403,
        "not authorized: insufficient permissions",
    );
    assert_error(
        &send(&u, Method::GET, "/v1/identity/self/describe", None).await,
        404,
        "identity does not exist",
    );
    // The admin's self-describe.
    let me = srv.admin().describe_self().await.unwrap();
    assert!(me.admin);
    assert_eq!(me.identity, srv.admin_id());
}

async fn policy_matrix(store: Store) {
    let (app_creds, app) = client_cert(&rcgen::PKCS_ED25519);
    let (ro_creds, ro) = client_cert(&rcgen::PKCS_ECDSA_P256_SHA256);
    let policies = [
        TestPolicy {
            name: "app",
            allow: vec![
                "/v1/key/generate/app-*",
                "/v1/key/decrypt/app-*",
                "/v1/key/create/app-*",
                "/v1/status",
                "/v1/key/list/*",
            ],
            deny: vec!["/v1/key/generate/app-secret*", "/v1/key/create/app-secret*"],
            identities: vec![app],
        },
        TestPolicy {
            name: "readonly",
            allow: vec!["/v1/key/describe/*"],
            deny: vec![],
            identities: vec![ro],
        },
    ];
    let srv = TestServer::start(store, &policies).await;
    let admin = srv.admin();
    let a = srv.client(app_creds);
    let r = srv.client(ro_creds);
    let k = format!("app-{}", name("m"));
    let secret = format!("app-secret-{}", name("m"));
    admin.create_key(&secret).await.unwrap();
    let allowed =
        |res: &Result<(), ClientError>| res.as_ref().map_err(|e| e.api().cloned()).is_ok();
    let denied = |res: &Result<(), ClientError>| {
        res.as_ref().err().and_then(|e| e.api()) == Some(&errors::NOT_ALLOWED)
    };

    let res = a.create_key(&k).await;
    assert!(allowed(&res), "{res:?}");
    assert!(denied(&a.create_key(&secret).await));
    assert!(denied(&a.create_key("other-key").await));
    assert!(allowed(&a.generate_key(&k, b"").await.map(drop)));
    assert!(denied(&a.generate_key(&secret, b"").await.map(drop)));
    assert!(denied(&a.encrypt(&k, b"x", b"").await.map(drop)));
    assert!(denied(&a.delete_key(&k).await));
    // MinIO lists with the slash-less path; policies see it as `/v1/key/list/`, as after KES's 301.
    assert!(allowed(&a.list_keys("").await.map(drop)));
    assert!(allowed(&a.list_keys("app*").await.map(drop)));
    assert!(allowed(&a.status().await.map(drop)));
    // Exact patterns match exactly.
    assert_error(
        &send(&a, Method::GET, "/v1/metrics", None).await,
        403,
        "not authorized: insufficient permissions",
    );
    assert!(denied(&r.create_key(&name("ro")).await));
    assert!(allowed(&r.describe_key(&k).await.map(drop)));
    assert!(denied(&r.status().await.map(drop)));
    assert!(denied(&r.list_keys("").await.map(drop)));
    // The admin bypasses every policy.
    assert!(allowed(&admin.delete_key(&k).await));
}

async fn policy_and_identity_routes(store: Store) {
    let (creds, id) = client_cert(&rcgen::PKCS_ED25519);
    let policies = [
        TestPolicy {
            name: "minio",
            allow: vec!["/v1/key/*", "/v1/identity/self/describe"],
            deny: vec!["/v1/key/delete/*"],
            identities: vec![id.clone()],
        },
        TestPolicy {
            name: "monitor",
            allow: vec!["/v1/metrics"],
            deny: vec![],
            identities: vec![],
        },
    ];
    let srv = TestServer::start(store, &policies).await;
    let c = srv.admin();
    let admin = srv.admin_id();

    let p: api::DescribePolicyResponse =
        json(&send(&c, Method::GET, "/v1/policy/describe/minio", None).await);
    assert_eq!(
        (p.name.as_str(), p.created_by.as_str()),
        ("minio", admin.as_str())
    );
    let raw = send(&c, Method::GET, "/v1/policy/read/minio", None).await;
    let p: api::ReadPolicyResponse = json(&raw);
    assert_eq!(
        p.allow.keys().collect::<Vec<_>>(),
        vec!["/v1/identity/self/describe", "/v1/key/*"]
    );
    assert_eq!(p.deny.keys().collect::<Vec<_>>(), vec!["/v1/key/delete/*"]);
    assert!(String::from_utf8_lossy(&raw.body).contains("\"deny\":{\"/v1/key/delete/*\":{}}"));
    let p: api::ReadPolicyResponse =
        json(&send(&c, Method::GET, "/v1/policy/read/monitor", None).await);
    assert!(p.deny.is_empty());
    assert_error(
        &send(&c, Method::GET, "/v1/policy/read/nope", None).await,
        404,
        "policy does not exist",
    );

    for (pattern, expect) in [
        ("", vec!["minio", "monitor"]),
        ("*", vec!["minio", "monitor"]),
        ("mon*", vec!["monitor"]),
        ("x", vec![]),
    ] {
        let path = if pattern.is_empty() {
            "/v1/policy/list".to_owned()
        } else {
            format!("/v1/policy/list/{pattern}")
        };
        let raw = send(&c, Method::GET, &path, None).await;
        let l: api::ListPoliciesResponse = json(&raw);
        assert_eq!(l.names, expect, "{pattern}");
        assert!(String::from_utf8_lossy(&raw.body).contains("\"continue_at\":\"\""));
    }

    let d: api::DescribeIdentityResponse = json(
        &send(
            &c,
            Method::GET,
            &format!("/v1/identity/describe/{id}"),
            None,
        )
        .await,
    );
    assert_eq!(
        (d.admin, d.policy.as_str(), d.created_by.as_str()),
        (false, "minio", admin.as_str())
    );
    let d: api::DescribeIdentityResponse = json(
        &send(
            &c,
            Method::GET,
            &format!("/v1/identity/describe/{admin}"),
            None,
        )
        .await,
    );
    assert!(d.admin && d.policy.is_empty() && d.created_by.is_empty());
    assert_error(
        &send(
            &c,
            Method::GET,
            &format!("/v1/identity/describe/{}", "0".repeat(64)),
            None,
        )
        .await,
        404,
        "identity does not exist",
    );
    let l: api::ListIdentitiesResponse =
        json(&send(&c, Method::GET, "/v1/identity/list/*", None).await);
    let mut expect = vec![admin.clone(), id.to_string()];
    expect.sort();
    assert_eq!(l.identities, expect);

    // Self-describe for a policy identity, in the shape kms-go decodes (a deliberate deviation).
    let me = srv.client(creds);
    let raw = send(&me, Method::GET, "/v1/identity/self/describe", None).await;
    let s: api::SelfDescribeResponse = json(&raw);
    assert_eq!(s.identity, id.to_string());
    assert_eq!(s.policy, "minio");
    assert!(s.allow.contains_key("/v1/key/*") && s.deny.contains_key("/v1/key/delete/*"));
    assert_eq!(s.created_by, admin);
    let v: serde_json::Value = serde_json::from_slice(&raw.body).unwrap();
    assert!(v["policy"].is_string());
}

async fn status_metrics_api_version(store: Store) {
    let hsm = store.pkcs11.is_some();
    let srv = TestServer::start(store, &[]).await;
    let c = srv.admin();
    let v: api::VersionResponse = json(&send(&c, Method::GET, "/version", None).await);
    assert_eq!(v.version, env!("CARGO_PKG_VERSION"));
    assert!(!v.commit.is_empty());
    assert_empty_ok(&send(&c, Method::GET, "/v1/ready", None).await);

    let raw = send(&c, Method::GET, "/v1/status", None).await;
    let s: serde_json::Value = json(&raw);
    for f in [
        "version",
        "os",
        "arch",
        "uptime",
        "num_cpu",
        "num_cpu_used",
        "mem_heap_used",
        "mem_stack_used",
        "keystore_latency",
    ] {
        assert!(s.get(f).is_some(), "status lacks {f}: {s}");
    }
    assert!(s["keystore_latency"].as_u64().unwrap() >= 1);
    assert!(s.get("keystore_unreachable").is_none());
    assert!(s.get("keystore_unavailable").is_none());

    let routes: Vec<api::ApiRoute> = json(&send(&c, Method::GET, "/v1/api", None).await);
    assert_eq!(
        routes.len(),
        26,
        "KES's 22, /v1/metrics/kesh and the three key-version routes"
    );
    let find = |p: &str| routes.iter().find(|r| r.path == p).unwrap().clone();
    assert_eq!(
        find("/v1/key/generate/"),
        api::ApiRoute {
            method: "PUT".into(),
            path: "/v1/key/generate/".into(),
            max_body: 1_000_000,
            timeout: 15
        }
    );
    assert_eq!(
        find("/version"),
        api::ApiRoute {
            method: "GET".into(),
            path: "/version".into(),
            max_body: 0,
            timeout: 10
        }
    );
    assert_eq!(find("/v1/log/audit").timeout, 0);
    assert_eq!(find("/v1/key/delete/").method, "DELETE");

    assert_eq!(find("/v1/metrics/kesh").method, "GET");

    let k = name("metrics");
    c.create_key(&k).await.unwrap();
    c.generate_key(&k, b"").await.unwrap();
    let _ = c.describe_key("no-such-key").await;
    let raw = send(&c, Method::GET, "/v1/metrics", None).await;
    assert_eq!(raw.status, 200);
    assert_eq!(
        raw.headers["content-type"],
        "text/plain; version=0.0.4; charset=utf-8; escaping=underscores"
    );
    let text = String::from_utf8(raw.body.to_vec()).unwrap();
    let families = decode_like_kms_go(&text).unwrap_or_else(|e| panic!("{e}:\n{text}"));
    for family in KES_METRIC_FAMILIES {
        assert!(
            families.contains(family),
            "/v1/metrics lacks {family}:\n{text}"
        );
    }
    assert!(
        !text.contains("kesh_"),
        "kesh's families are on /v1/metrics/kesh:\n{text}"
    );
    for needle in [
        "# TYPE kes_http_request_active gauge",
        "kes_http_request_success{code=\"200\"} 2",
        "kes_http_request_error{code=\"404\"} 1",
        "# TYPE kes_http_response_time histogram",
        "kes_http_response_time_bucket{le=\"+Inf\"} 3",
        "kes_log_audit_events 0",
        "kes_system_up_time ",
        "kes_system_num_cpu ",
    ] {
        assert!(text.contains(needle), "metrics lack {needle:?}:\n{text}");
    }

    let raw = send(&c, Method::GET, "/v1/metrics/kesh", None).await;
    assert_eq!(
        raw.headers["content-type"],
        "text/plain; version=0.0.4; charset=utf-8; escaping=underscores"
    );
    let all = String::from_utf8(raw.body.to_vec()).unwrap();
    for needle in [
        "kes_http_request_success{code=\"200\"} 2",
        "kesh_keystore_operation_seconds_count{op=\"generate\"} 1",
        "kesh_keystore_errors_total{kind=\"key_not_found\",op=\"describe\"} 1",
        &format!("kesh_seals_total{{key=\"{k}\"}} 1"),
    ] {
        assert!(all.contains(needle), "kesh metrics lack {needle:?}:\n{all}");
    }
    for hsm_family in [
        "kesh_hsm_sessions{state=\"size\"} ",
        "kesh_hsm_login_refused 0\n",
    ] {
        assert_eq!(all.contains(hsm_family), hsm, "{hsm_family}:\n{all}");
    }
}

/// The families MinIO reads from `/v1/metrics` (kms-go `kes.Client.Metrics`); the three
/// request counters appear after the first request of their class, as in KES.
const KES_METRIC_FAMILIES: [&str; 13] = [
    "kes_http_request_active",
    "kes_http_request_error",
    "kes_http_request_success",
    "kes_http_response_time",
    "kes_log_audit_events",
    "kes_log_error_events",
    "kes_system_mem_heap_objects",
    "kes_system_mem_heap_used",
    "kes_system_mem_stack_used",
    "kes_system_num_cpu",
    "kes_system_num_cpu_used",
    "kes_system_num_threads",
    "kes_system_up_time",
];

/// Decodes a metrics page the way kms-go's `kes.Client.Metrics` does (Prometheus' text
/// decoder, then its checks): a family with no series is refused, and so is one with more than
/// one series unless it is one of the three `kes_http_request_*` counters, which it sums.
/// Returns the family names.
fn decode_like_kms_go(text: &str) -> Result<std::collections::BTreeSet<String>, String> {
    use std::collections::BTreeSet;
    let mut kinds = BTreeMap::new();
    let mut series: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').ok_or("TYPE without a kind")?;
            kinds.insert(name.to_owned(), kind.to_owned());
            series.entry(name.to_owned()).or_default();
            continue;
        }
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (sample, value) = line.rsplit_once(' ').ok_or("sample without a value")?;
        value.parse::<f64>().map_err(|e| format!("{line}: {e}"))?;
        let (name, labels) = match sample.split_once('{') {
            Some((n, l)) => (n, l.strip_suffix('}').ok_or("unclosed labels")?),
            None => (sample, ""),
        };
        // A histogram's buckets, sum and count are one series per label set without `le`.
        let family = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|suffix| {
                name.strip_suffix(suffix)
                    .filter(|f| kinds.get(*f).is_some_and(|k| k == "histogram"))
            })
            .unwrap_or(name);
        let labels: Vec<&str> = labels
            .split(',')
            .filter(|l| !l.is_empty() && !l.starts_with("le="))
            .collect();
        series
            .entry(family.to_owned())
            .or_default()
            .insert(labels.join(","));
    }
    const SUMMED: [&str; 3] = [
        "kes_http_request_success",
        "kes_http_request_error",
        "kes_http_request_failure",
    ];
    for (family, s) in &series {
        if s.is_empty() {
            return Err(format!(
                "kes: server response contains no metric ({family})"
            ));
        }
        if s.len() > 1 && !SUMMED.contains(&family.as_str()) {
            return Err(format!(
                "kes: server response contains more than one metric ({family})"
            ));
        }
    }
    Ok(series.into_keys().collect())
}

async fn audit_stream_delivers(store: Store) {
    let hsm = store.pkcs11.is_some();
    // The pool is as large as the module's profile makes it.
    let pool = store
        .pkcs11
        .as_ref()
        .map_or(0, |(ks, _)| ks.settings().sessions);
    let srv = TestServer::start(store, &[]).await;
    let c = srv.admin();
    let mut audit = c.stream("/v1/log/audit").await.unwrap();
    let k = name("audit");
    c.create_key(&k).await.unwrap();
    let g = c.generate_key(&k, b"secret context").await.unwrap();
    let _ = c.describe_key("audit-missing").await;
    // A refused request is on the trail too, with the caller's identity.
    let (creds, stranger_id) = client_cert(&rcgen::PKCS_ED25519);
    let stranger = srv.client(creds);
    let _ = stranger.delete_key(&k).await;
    let mut events = Vec::new();
    for _ in 0..4 {
        let line = tokio::time::timeout(Duration::from_secs(5), audit.next_line())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        let text = String::from_utf8(line.to_vec()).unwrap();
        assert!(
            !text.contains(&b64e(&g.plaintext.0)),
            "audit line leaks the DEK: {text}"
        );
        assert!(!text.contains(&b64e(&g.ciphertext.0)));
        events.push(serde_json::from_str::<api::AuditEvent>(&text).unwrap());
    }
    let admin = srv.admin_id();
    let summary: Vec<(String, u16, String)> = events
        .iter()
        .map(|e| {
            (
                e.request.path.clone(),
                e.response.code,
                e.request.identity.clone(),
            )
        })
        .collect();
    assert_eq!(
        summary,
        vec![
            (format!("/v1/key/create/{k}"), 200, admin.clone()),
            (format!("/v1/key/generate/{k}"), 200, admin.clone()),
            (
                "/v1/key/describe/audit-missing".to_owned(),
                404,
                admin.clone()
            ),
            (format!("/v1/key/delete/{k}"), 403, stranger_id.to_string()),
        ]
    );
    assert_eq!(events[0].request.ip, "127.0.0.1");
    let metrics = c.kesh_metrics().await.unwrap();
    assert!(metrics.contains("kes_log_audit_events 4"), "{metrics}");
    // As in KES, requests refused by authentication are not in the HTTP counters.
    assert!(!metrics.contains("code=\"403\""), "{metrics}");
    assert!(metrics.contains("kesh_policy_denials_total 1"), "{metrics}");
    // The HSM's session pool shows up only where there is one.
    assert_eq!(
        metrics.contains(&format!("kesh_hsm_sessions{{state=\"size\"}} {pool}\n")),
        hsm,
        "{metrics}"
    );
    assert_eq!(
        metrics.contains("kesh_hsm_session_acquired_total "),
        hsm,
        "{metrics}"
    );
    c.describe_key(&k).await.unwrap();
}

// ---- tests that need no second keystore run ----

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
    let srv = TestServer::start_with(ks, None, &[], &BTreeMap::new()).await;
    let c = srv.admin();
    let mut errors_stream = c.stream("/v1/log/error").await.unwrap();

    let r = send(&c, Method::POST, "/v1/key/generate/busy", Some(b"{}")).await;
    assert_error(&r, 503, "key store is busy");
    assert_eq!(r.headers["retry-after"], "1");
    assert_error(
        &send(&c, Method::POST, "/v1/key/generate/down", Some(b"{}")).await,
        504,
        "key store is not reachable",
    );
    assert_error(
        &send(&c, Method::POST, "/v1/key/generate/k", Some(b"{}")).await,
        500,
        "failed to generate encryption key",
    );
    assert_error(
        &send(&c, Method::POST, "/v1/key/encrypt/k", Some(b"{}")).await,
        500,
        "failed to encrypt plaintext",
    );
    assert_error(
        &send(&c, Method::POST, "/v1/key/decrypt/k", Some(b"{}")).await,
        500,
        "failed to decrypt ciphertext",
    );
    assert_error(
        &send(&c, Method::POST, "/v1/key/create/k", None).await,
        502,
        "failed to create key",
    );
    assert_error(
        &send(&c, Method::GET, "/v1/key/describe/k", None).await,
        502,
        "failed to read key",
    );
    assert_error(
        &send(&c, Method::DELETE, "/v1/key/delete/k", None).await,
        502,
        "failed to delete key",
    );
    assert_error(
        &send(&c, Method::GET, "/v1/key/list/", None).await,
        502,
        "failed to list keys",
    );
    assert_error(
        &send(&c, Method::PUT, "/v1/key/hmac/nohmac", Some(b"{}")).await,
        409,
        "key does not support HMAC",
    );
    let body = format!(
        "{{\"key\":\"{}\",\"cipher\":\"ChaCha20\"}}",
        b64e(&[1u8; 32])
    );
    assert_error(
        &send(
            &c,
            Method::POST,
            "/v1/key/import/chacha",
            Some(body.as_bytes()),
        )
        .await,
        406,
        "algorithm 'ChaCha20' is not supported",
    );

    // Unreachable keystore: ready is 504, status reports it the way KES does.
    assert_error(
        &send(&c, Method::GET, "/v1/ready", None).await,
        504,
        "key store is not reachable",
    );
    let s: serde_json::Value = json(&send(&c, Method::GET, "/v1/status", None).await);
    assert_eq!(s["keystore_unreachable"], true);
    assert!(s.get("keystore_latency").is_none() && s.get("keystore_unavailable").is_none());

    let line = tokio::time::timeout(Duration::from_secs(5), errors_stream.next_line())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
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
    let srv = TestServer::start_with(ks, None, &[], &BTreeMap::new()).await;
    assert_error(
        &send(&srv.admin(), Method::GET, "/v1/ready", None).await,
        502,
        "key store is unavailable",
    );
}

/// Without a client certificate the TLS handshake is refused; TLS 1.2 works with Ed25519.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_requires_client_certificates() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let srv = TestServer::start(harness::soft(), &[]).await;
    let mut roots = rustls::RootCertStore::empty();
    roots.add(srv.certs.ca.clone()).unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());

    let no_cert = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots.clone())
        .with_no_client_auth();
    let tcp = tokio::net::TcpStream::connect(srv.addr).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap();
    let refused = async {
        let mut tls = tokio_rustls::TlsConnector::from(Arc::new(no_cert))
            .connect(name.clone(), tcp)
            .await?;
        tls.write_all(b"GET /version HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .await?;
        let mut buf = Vec::new();
        tls.read_to_end(&mut buf).await?;
        Ok::<_, std::io::Error>(buf)
    }
    .await;
    match refused {
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
    let (cert, pkcs8) = key.certificate().unwrap();
    let tls12 = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS12])
        .unwrap()
        .with_root_certificates(roots)
        .with_client_auth_cert(
            vec![CertificateDer::from(cert)],
            PrivateKeyDer::try_from(pkcs8.to_vec()).unwrap(),
        )
        .unwrap();
    let tcp = tokio::net::TcpStream::connect(srv.addr).await.unwrap();
    let mut tls = tokio_rustls::TlsConnector::from(Arc::new(tls12))
        .connect(name, tcp)
        .await
        .unwrap();
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
    let mut api = BTreeMap::new();
    api.insert(
        "/v1/status".to_owned(),
        RouteOverride {
            skip_auth: true,
            timeout: Some(Duration::from_secs(3)),
        },
    );
    let (creds, _) = client_cert(&rcgen::PKCS_ED25519);
    let srv = TestServer::start_with(
        Arc::new(kesh::keystore::soft::SoftKeyStore::in_memory()),
        None,
        &[],
        &api,
    )
    .await;
    let stranger = srv.client(creds);
    stranger.status().await.unwrap();
    assert_error(
        &send(&stranger, Method::GET, "/v1/metrics", None).await,
        403,
        "not authorized: insufficient permissions",
    );
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

/// A config file drives the server; editing it and reloading (what SIGHUP runs) swaps the
/// policies without restarting.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn config_file_and_reload() {
    let dir = tempfile::tempdir().unwrap();
    let certs = server_certs();
    std::fs::write(dir.path().join("key.pem"), &certs.key_pem).unwrap();
    std::fs::write(dir.path().join("cert.pem"), &certs.cert_pem).unwrap();
    let admin = ApiKey::generate().unwrap();
    let (creds, id) = client_cert(&rcgen::PKCS_ED25519);
    let write = |allow: &str| {
        let text = format!(
            "address: 127.0.0.1:0\nadmin:\n  identity: {admin}\ntls:\n  key: {0}/key.pem\n  cert: {0}/cert.pem\npolicy:\n  app:\n    allow:\n    - {allow}\n    identities:\n    - {id}\nkeys:\n  - name: predefined-key\nkeystore:\n  soft: {{}}\n",
            dir.path().display(),
            admin = admin.identity()
        );
        std::fs::write(dir.path().join("config.yaml"), text).unwrap();
    };
    write("/v1/key/list/*");
    let cfg = ServerConfig::load(&dir.path().join("config.yaml")).unwrap();
    assert_eq!(cfg.admin, admin.identity());

    let ks = cfg.keystore.open().await.unwrap();
    let metrics = Arc::new(Metrics::new());
    let service = Arc::new(Service::new(
        ks,
        cfg.authorizer(OffsetDateTime::now_utc()).unwrap(),
        metrics.clone(),
    ));
    kesh::server::create_keys(&service, &cfg.keys)
        .await
        .unwrap();
    let parts = ServerParts {
        service,
        tls: kesh::server::tls_from_config(&cfg).unwrap(),
        routes: RouteSettings::new(&cfg.api),
        // Not to stdout: the test harness cannot capture lines written there.
        audit: AuditLog::new(metrics.clone(), false),
        errors: ErrorLog::new(metrics, cfg.log.error),
    };
    let server = Server::bind(cfg.address.unwrap(), parts).await.unwrap();
    let addr = server.local_addr().unwrap();
    let handle = server.handle();
    let task = tokio::spawn(server.run());

    let c = Client::new(
        &addr.to_string(),
        creds,
        ServerTrust::Roots(vec![certs.ca.clone()]),
    )
    .unwrap();
    assert_eq!(
        c.list_keys("").await.unwrap(),
        vec!["predefined-key".to_owned()]
    );
    assert_eq!(
        c.create_key("new-key").await.unwrap_err().api(),
        Some(&errors::NOT_ALLOWED)
    );

    // A keep-alive connection opened before the reload must survive it.
    let (cert, pkcs8) = admin.certificate().unwrap();
    let mut roots = rustls::RootCertStore::empty();
    roots.add(certs.ca.clone()).unwrap();
    let mut tls_cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_client_auth_cert(
        vec![CertificateDer::from(cert)],
        PrivateKeyDer::try_from(pkcs8.to_vec()).unwrap(),
    )
    .unwrap();
    tls_cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let tls = tokio_rustls::TlsConnector::from(Arc::new(tls_cfg))
        .connect(
            rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap(),
            tcp,
        )
        .await
        .unwrap();
    let (mut kept, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls))
        .await
        .unwrap();
    let conn_task = tokio::spawn(conn);
    let status_req = || {
        http::Request::get("/v1/status")
            .header("host", "127.0.0.1")
            .body(http_body_util::Empty::<Bytes>::new())
            .unwrap()
    };
    assert_eq!(kept.send_request(status_req()).await.unwrap().status(), 200);

    write("/v1/key/create/*");
    handle
        .reload(&ServerConfig::load(&dir.path().join("config.yaml")).unwrap())
        .await
        .unwrap();
    c.create_key("new-key").await.unwrap();
    assert_eq!(
        c.list_keys("").await.unwrap_err().api(),
        Some(&errors::NOT_ALLOWED)
    );

    let resp = kept.send_request(status_req()).await.unwrap();
    assert_eq!(
        resp.status(),
        200,
        "the kept-alive connection still serves after the reload"
    );
    assert!(!conn_task.is_finished());

    // A broken file leaves the running configuration alone.
    std::fs::write(dir.path().join("config.yaml"), "admin: [").unwrap();
    assert!(ServerConfig::load(&dir.path().join("config.yaml")).is_err());
    c.create_key("newer-key").await.unwrap();

    handle.shutdown();
    tokio::time::timeout(Duration::from_secs(10), task)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
}

/// `kesh server --dev` on a machine with SoftHSM: an ephemeral token of its own.
#[test]
fn dev_server_with_softhsm() {
    // The user's SOFTHSM2_CONF names a real token directory; --dev must leave it untouched.
    let users = tempfile::tempdir().unwrap();
    std::fs::create_dir(users.path().join("tokens")).unwrap();
    let conf = users.path().join("softhsm2.conf");
    std::fs::write(
        &conf,
        format!(
            "directories.tokendir = {}\n",
            users.path().join("tokens").display()
        ),
    )
    .unwrap();
    let keystore = run_dev_server(&[("SOFTHSM2_CONF", conf.to_str().unwrap())]);
    assert!(
        keystore.contains("SoftHSM"),
        "SoftHSM is installed, so --dev must use it: {keystore}"
    );
    assert_eq!(
        std::fs::read_dir(users.path().join("tokens"))
            .unwrap()
            .count(),
        0,
        "--dev wrote into the user's token directory"
    );
}

/// `kesh server --dev` on a machine without SoftHSM: the in-memory soft keystore.
#[test]
fn dev_server_without_softhsm() {
    let keystore = run_dev_server(&[("KESH_SOFTHSM_MODULE", "/nonexistent/libsofthsm2.so")]);
    assert!(keystore.contains("soft keystore in memory"), "{keystore}");
}

/// Starts `kesh server --dev`, checks it prints an admin API key like KES, uses it as the
/// admin, stops it with SIGTERM, and returns the banner's keystore line. Start-up time is
/// printed, not asserted (timing is a benchmark's job on shared machines).
fn run_dev_server(env: &[(&str, &str)]) -> String {
    use std::io::{BufRead, BufReader};
    let start = Instant::now();
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_kesh"));
    cmd.args(["server", "--dev", "--addr", "127.0.0.1:0"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .env_remove("SOFTHSM2_CONF");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().unwrap();
    let stdout = child.stdout.take().unwrap();
    let mut lines = BufReader::new(stdout).lines();
    let (mut api_key, mut admin, mut addr, mut keystore) = (None, None, None, None);
    for line in lines.by_ref() {
        let line = line.unwrap();
        if let Some(rest) = line.strip_prefix("API Key") {
            api_key = Some(rest.trim().to_owned());
        } else if let Some(rest) = line.strip_prefix("Admin") {
            admin = Some(rest.trim().to_owned());
        } else if let Some(rest) = line.strip_prefix("API         · https://") {
            addr = Some(rest.trim().to_owned());
        } else if let Some(rest) = line.strip_prefix("Keystore") {
            keystore = Some(rest.trim().to_owned());
        } else if line.contains("Server is up and running") {
            break;
        }
    }
    let (api_key, admin, addr, keystore) = (
        api_key.unwrap(),
        admin.unwrap(),
        addr.unwrap(),
        keystore.unwrap(),
    );
    let took = start.elapsed();
    crate::harness::report(&format!(
        "kesh server --dev ({keystore}) was serving after {took:?}"
    ));
    // The issue's bound for a fresh machine; measured here in tens of milliseconds.
    assert!(
        took < Duration::from_secs(2),
        "--dev took {took:?} to serve"
    );
    let key = ApiKey::parse(&api_key).unwrap();
    assert!(api_key.starts_with("kes:v1:"));
    assert_eq!(key.identity().to_string(), admin);

    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let c = Client::new(&addr, Credentials::ApiKey(key), ServerTrust::DangerInsecure).unwrap();
        let me = c.describe_self().await.unwrap();
        assert!(me.admin);
        c.create_key("dev-key").await.unwrap();
        c.generate_key("dev-key", b"").await.unwrap();
    });
    // Hardened at start: no core dumps, and (as root, as CI runs) memory locked.
    let limits = std::fs::read_to_string(format!("/proc/{}/limits", child.id())).unwrap();
    let core = limits
        .lines()
        .find(|l| l.starts_with("Max core file size"))
        .unwrap();
    assert_eq!(core.split_whitespace().nth(4), Some("0"), "{core}");
    let status = std::fs::read_to_string(format!("/proc/{}/status", child.id())).unwrap();
    let locked_kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmLck:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap();
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        assert!(locked_kb > 0, "memory not locked: {status}");
    }
    let killed = std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    let status = child.wait().unwrap();
    assert!(status.success(), "{status:?}");
    keystore
}

/// `tls.auth: on`: only certificates that chain to `tls.ca` get in.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_auth_on_verifies_client_chains() {
    let ca_key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "client CA");
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "minio");
    params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
    let leaf = params.signed_by(&key, &ca, &ca_key).unwrap();
    let id = Identity::from_certificate(leaf.der()).unwrap();
    let issued = Credentials::Certificate {
        chain: vec![leaf.der().clone()],
        key: PrivateKeyDer::try_from(key.serialize_der()).unwrap(),
    };
    let (self_signed, self_id) = client_cert(&rcgen::PKCS_ED25519);

    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca.der().clone()).unwrap();
    let policies = [TestPolicy {
        name: "p",
        allow: vec!["/v1/status"],
        deny: vec![],
        identities: vec![id.clone(), self_id],
    }];
    let ks = Arc::new(kesh::keystore::soft::SoftKeyStore::in_memory());
    let srv = TestServer::start_full(
        ks,
        None,
        &policies,
        &BTreeMap::new(),
        ClientAuth::VerifyChain(Arc::new(roots)),
    )
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

/// A keystore that answers slowly, to check per-route deadlines.
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
    let mut api = BTreeMap::new();
    api.insert(
        "/v1/key/generate/".to_owned(),
        RouteOverride {
            skip_auth: false,
            timeout: Some(Duration::from_millis(300)),
        },
    );
    let ks = Arc::new(Misbehaving(
        kesh::keystore::soft::SoftKeyStore::in_memory(),
        OnGenerate::Sleep(Duration::from_secs(3)),
    ));
    let srv = TestServer::start_with(ks, None, &[], &api).await;
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
    let line = tokio::time::timeout(Duration::from_secs(5), audit.next_line())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    let event: api::AuditEvent = serde_json::from_slice(&line).unwrap();
    assert_eq!(
        (event.request.path.as_str(), event.response.code),
        ("/v1/key/generate/slow", 504)
    );
}

/// Reads the banner of a `kesh server` child until it is up; returns the API address.
pub(crate) fn signal(child: &std::process::Child, sig: &str) {
    let ok = std::process::Command::new("kill")
        .args([sig, &child.id().to_string()])
        .status()
        .unwrap();
    assert!(ok.success());
}

/// `kesh server --config FILE`: a real process, a real SIGHUP reload of a policy, SIGTERM.
#[test]
fn server_process_reloads_policies_on_sighup() {
    let dir = tempfile::tempdir().unwrap();
    let certs = server_certs();
    std::fs::write(dir.path().join("key.pem"), &certs.key_pem).unwrap();
    std::fs::write(dir.path().join("cert.pem"), &certs.cert_pem).unwrap();
    let (creds, id) = client_cert(&rcgen::PKCS_ECDSA_P256_SHA256);
    let config = dir.path().join("config.yaml");
    let write = |allow: &str| {
        let text = format!(
            "address: 127.0.0.1:0\nadmin:\n  identity: disabled\ntls:\n  key: {0}/key.pem\n  cert: {0}/cert.pem\npolicy:\n  app:\n    allow: [{allow}]\n    identities: [\"{id}\"]\nkeys:\n  - name: k1\nkeystore:\n  soft: {{}}\n",
            dir.path().display()
        );
        std::fs::write(&config, text).unwrap();
    };
    write("/v1/status");
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_kesh"))
        .args(["server", "--config", config.to_str().unwrap()])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .env_remove("SOFTHSM2_CONF")
        .spawn()
        .unwrap();
    let addr = harness::wait_for_banner(&mut child);
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let c = Client::new(&addr, creds, ServerTrust::Roots(vec![certs.ca.clone()])).unwrap();
        c.status().await.unwrap();
        assert_eq!(
            c.list_keys("").await.unwrap_err().api(),
            Some(&errors::NOT_ALLOWED)
        );
        write("/v1/key/list/*");
        signal(&child, "-HUP");
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            match c.list_keys("").await {
                Ok(names) => {
                    assert_eq!(names, vec!["k1".to_owned()]);
                    break;
                }
                Err(e) if Instant::now() < deadline => {
                    assert_eq!(e.api(), Some(&errors::NOT_ALLOWED));
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(e) => panic!("policy not reloaded after SIGHUP: {e}"),
            }
        }
        assert_eq!(
            c.status().await.unwrap_err().api(),
            Some(&errors::NOT_ALLOWED)
        );
    });
    signal(&child, "-TERM");
    assert!(child.wait().unwrap().success());
}

/// A KES backend kesh does not serve is refused at start with the way out.
#[test]
fn server_refuses_kes_backends() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("config.yaml");
    std::fs::write(
        &config,
        "admin:\n  identity: disabled\ntls:\n  key: k.pem\n  cert: c.pem\nkeystore:\n  vault:\n    endpoint: https://127.0.0.1:8200\n",
    )
    .unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_kesh"))
        .args(["server", "--config", config.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    for word in ["pkcs11", "soft", "kesh migrate"] {
        assert!(err.contains(word), "{err}");
    }
}

/// With some route on `skip_auth`, certificates become optional: that route answers without
/// one, every other route says 400 `tls: client certificate is required`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn skip_auth_makes_certificates_optional() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut api = BTreeMap::new();
    api.insert(
        "/v1/ready".to_owned(),
        RouteOverride {
            skip_auth: true,
            timeout: None,
        },
    );
    let ks = Arc::new(kesh::keystore::soft::SoftKeyStore::in_memory());
    let srv = TestServer::start_with(ks, None, &[], &api).await;
    let mut roots = rustls::RootCertStore::empty();
    roots.add(srv.certs.ca.clone()).unwrap();
    let config = Arc::new(
        rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth(),
    );
    let get = |path: &'static str| {
        let config = config.clone();
        async move {
            let tcp = tokio::net::TcpStream::connect(srv.addr).await.unwrap();
            let name = rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap();
            let mut tls = tokio_rustls::TlsConnector::from(config)
                .connect(name, tcp)
                .await
                .unwrap();
            let req = format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
            tls.write_all(req.as_bytes()).await.unwrap();
            let mut buf = Vec::new();
            tls.read_to_end(&mut buf).await.unwrap();
            String::from_utf8(buf).unwrap()
        }
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
    let ca_key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let key = ApiKey::generate().unwrap();
    let (leaf, pkcs8) = key.certificate().unwrap();
    let (other, _) = ApiKey::generate().unwrap().certificate().unwrap();
    let ks = Arc::new(kesh::keystore::soft::SoftKeyStore::in_memory());
    let policies = [TestPolicy {
        name: "p",
        allow: vec!["/v1/status"],
        deny: vec![],
        identities: vec![key.identity()],
    }];
    let srv = TestServer::start_with(ks, None, &policies, &BTreeMap::new()).await;
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
    assert_error(
        &send(&two, Method::GET, "/v1/status", None).await,
        400,
        "tls: received more than one client certificate",
    );
}

/// Idle and half-open clients cannot starve the others: hundreds of connections that never
/// finish a TLS handshake leave requests from a real client served, and the server closes
/// them after its handshake timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_do_not_starve_clients() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let srv = TestServer::start(harness::soft(), &[]).await;
    let mut idle = Vec::new();
    for i in 0..300 {
        let mut s = tokio::net::TcpStream::connect(srv.addr).await.unwrap();
        if i % 2 == 0 {
            // Half a TLS record header: a slow-loris handshake.
            s.write_all(&[0x16, 0x03]).await.unwrap();
        }
        idle.push(s);
    }
    let c = srv.admin();
    let k = name("starve");
    c.create_key(&k).await.unwrap();
    for _ in 0..20 {
        c.generate_key(&k, b"").await.unwrap();
    }
    // The handshake timeout (10 s) closes every one of them.
    let mut buf = [0u8; 16];
    for s in idle.iter_mut().take(10) {
        let n = tokio::time::timeout(Duration::from_secs(20), s.read(&mut buf))
            .await
            .expect("the server must close a connection that never completes its handshake");
        assert!(matches!(n, Ok(0) | Err(_)), "{n:?}");
    }
}

/// Past the connection limit new connections are closed at once; the server serves again
/// as soon as slots free up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_limit_closes_excess_connections() {
    use tokio::io::AsyncReadExt;
    let store = harness::soft();
    let ks = store.ks.clone();
    let srv = TestServer::start_limited(
        ks,
        Some(store),
        &[],
        &BTreeMap::new(),
        ClientAuth::AnyCertificate,
        8,
    )
    .await;
    let mut held = Vec::new();
    for _ in 0..8 {
        held.push(tokio::net::TcpStream::connect(srv.addr).await.unwrap());
    }
    // Let the server accept all eight before the ninth arrives.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut ninth = tokio::net::TcpStream::connect(srv.addr).await.unwrap();
    let mut buf = [0u8; 1];
    let n = tokio::time::timeout(Duration::from_secs(5), ninth.read(&mut buf))
        .await
        .expect("the ninth connection is closed at once");
    assert!(matches!(n, Ok(0) | Err(_)), "{n:?}");
    assert!(
        srv.admin().status().await.is_err(),
        "no slot for a client either"
    );
    drop(held);
    tokio::time::sleep(Duration::from_millis(200)).await;
    srv.admin().status().await.unwrap();
}

/// A panic in a handler costs that request a 500; the connection and the server live on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_handler_answers_500_and_the_server_lives_on() {
    let ks = Arc::new(Misbehaving(
        kesh::keystore::soft::SoftKeyStore::in_memory(),
        OnGenerate::Panic,
    ));
    let srv = TestServer::start_with(ks, None, &[], &BTreeMap::new()).await;
    let c = srv.admin();
    c.create_key("boom").await.unwrap();
    let r = send(&c, Method::POST, "/v1/key/generate/boom", Some(b"{}")).await;
    assert_error(&r, 500, "internal server error");
    c.describe_key("boom").await.unwrap();
    c.status().await.unwrap();
}
