//! A small KES API client over mTLS (hyper + rustls), used by the CLI and the tests.
//!
//! It speaks like kms-go's `kes` client: POST where KES routes are PUT, names path-escaped,
//! success only on status 200, and errors parsed the same way (docs/api.md, "Errors";
//! kms-go: `kes/error.go`): a
//! JSON `{"message"|"error"}` body or the body text, giving a [`KesError`] that compares
//! equal only when status *and* message match — so kms-go's typed errors work with `==`.
//! One TLS connection per request keeps it simple; HTTP/2 is used when the server picks it.

pub mod bench;

use std::borrow::Cow;
use std::fmt;
use std::sync::Arc;

use bytes::Bytes;
use http::{header, HeaderMap, Method, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

use crate::api;
use crate::identity::ApiKey;

/// Response bodies larger than this are refused (kms-go's 1 MiB).
const MAX_RESPONSE: usize = 1 << 20;

/// An error response of the server: status and message, compared as a pair.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct KesError {
    /// The HTTP status.
    pub status: u16,
    /// The message, exactly as the server sent it.
    pub message: Cow<'static, str>,
}

impl KesError {
    /// An error with a fixed message (for constants).
    pub const fn new(status: u16, message: &'static str) -> Self {
        KesError {
            status,
            message: Cow::Borrowed(message),
        }
    }
}

impl fmt::Display for KesError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.message, self.status)
    }
}

impl std::error::Error for KesError {}

/// The typed errors of kms-go (`kes/error.go` at github.com/minio/kms-go).
pub mod errors {
    use super::KesError;

    /// kms-go `ErrNotAllowed`.
    pub const NOT_ALLOWED: KesError =
        KesError::new(403, "not authorized: insufficient permissions");
    /// kms-go `ErrPartialWrite`.
    pub const PARTIAL_WRITE: KesError = KesError::new(503, "change committed but not replicated");
    /// kms-go `ErrKeyNotFound`.
    pub const KEY_NOT_FOUND: KesError = KesError::new(404, "key does not exist");
    /// kms-go `ErrKeyExists`.
    pub const KEY_EXISTS: KesError = KesError::new(400, "key already exists");
    /// kms-go `ErrSecretNotFound`.
    pub const SECRET_NOT_FOUND: KesError = KesError::new(404, "secret does not exist");
    /// kms-go `ErrSecretVersionNotFound`.
    pub const SECRET_VERSION_NOT_FOUND: KesError =
        KesError::new(404, "secret version does not exist");
    /// kms-go `ErrSecretExists`.
    pub const SECRET_EXISTS: KesError = KesError::new(404, "secret already exists");
    /// kms-go `ErrPolicyExists`.
    pub const POLICY_EXISTS: KesError = KesError::new(400, "policy already exists");
    /// kms-go `ErrPolicyNotFound`.
    pub const POLICY_NOT_FOUND: KesError = KesError::new(404, "policy does not exist");
    /// kms-go `ErrIdentityExists`.
    pub const IDENTITY_EXISTS: KesError = KesError::new(400, "identity already exists");
    /// kms-go `ErrIdentityNotFound`.
    pub const IDENTITY_NOT_FOUND: KesError = KesError::new(404, "identity does not exist");
    /// kms-go `ErrDecrypt`.
    pub const DECRYPT: KesError =
        KesError::new(400, "decryption failed: ciphertext is not authentic");
    /// kms-go `ErrEnclaveExists`.
    pub const ENCLAVE_EXISTS: KesError = KesError::new(400, "enclave already exists");
    /// kms-go `ErrEnclaveNotFound`.
    pub const ENCLAVE_NOT_FOUND: KesError = KesError::new(404, "enclave does not exist");
}

/// Errors of a client call.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The server answered with an error status.
    #[error("kes: {0}")]
    Api(KesError),
    /// A status that is neither 200 nor an error.
    #[error("kes: unexpected status {0}")]
    UnexpectedStatus(u16),
    #[error("kes: invalid endpoint '{0}'")]
    /// The endpoint is not a valid `https://host:port` URL.
    Endpoint(String),
    #[error("kes: {0}")]
    /// The certificate, key or API key could not be used.
    Credentials(String),
    #[error("kes: connection failed: {0}")]
    /// No TLS connection could be made, or it broke.
    Connect(String),
    /// The server's certificate failed verification (unknown issuer, wrong name, expired).
    #[error("kes: the server's certificate is not trusted: {0}")]
    UntrustedServer(String),
    #[error("kes: invalid response: {0}")]
    /// A 200 answer whose body is not what the route returns.
    Decode(String),
}

impl ClientError {
    /// The server's error, if that is what this is.
    pub fn api(&self) -> Option<&KesError> {
        match self {
            ClientError::Api(e) => Some(e),
            _ => None,
        }
    }
}

/// The client's certificate: from an API key, or a PEM certificate and key.
pub enum Credentials {
    /// A `kes:v1:` API key: the client makes its certificate from it.
    ApiKey(ApiKey),
    /// A PEM certificate chain and its private key.
    Certificate {
        /// The certificate chain, leaf first.
        chain: Vec<CertificateDer<'static>>,
        /// The leaf's private key.
        key: PrivateKeyDer<'static>,
    },
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Credentials::ApiKey(k) => f.debug_tuple("ApiKey").field(k).finish(),
            Credentials::Certificate { .. } => f.write_str("Certificate(<redacted key>)"),
        }
    }
}

/// How the server certificate is checked.
#[derive(Debug, Clone)]
pub enum ServerTrust {
    /// Verify the chain and name against these roots.
    Roots(Vec<CertificateDer<'static>>),
    /// Accept any server certificate (`-k/--insecure`); handshake signatures are still checked.
    DangerInsecure,
}

/// A raw response.
#[derive(Debug)]
pub struct RawResponse {
    /// The status.
    pub status: StatusCode,
    /// The headers.
    pub headers: HeaderMap,
    /// The body, up to 1 MiB.
    pub body: Bytes,
    /// The HTTP version the server chose.
    pub version: http::Version,
}

/// A KES API client for one endpoint.
#[derive(Clone)]
pub struct Client {
    addr: String,
    server_name: ServerName<'static>,
    tls: Arc<ClientConfig>,
}

impl fmt::Debug for Client {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Client")
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

/// Percent-escapes one path segment like Go's `url.PathEscape` for the characters that
/// matter: names are ASCII `[0-9A-Za-z_-]`, patterns add `*`.
pub(crate) fn escape_segment(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// A failed TLS handshake: our verdict on the server's certificate, or any other failure.
fn handshake_error(e: std::io::Error) -> ClientError {
    match e
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
    {
        Some(rustls::Error::InvalidCertificate(why)) => {
            ClientError::UntrustedServer(format!("{why:?}"))
        }
        _ => ClientError::Connect(e.to_string()),
    }
}

/// `path.Join(api, PathEscape(name))`: an empty name drops the trailing slash.
fn join(api: &str, name: &str) -> String {
    if name.is_empty() {
        api.trim_end_matches('/').to_owned()
    } else {
        format!("{api}{}", escape_segment(name))
    }
}

/// Turns an error response into a [`KesError`] the way kms-go's `parseErrorResponse` does.
pub fn parse_error(status: StatusCode, headers: &HeaderMap, body: &[u8]) -> KesError {
    let code = status.as_u16();
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .trim();
    let message = if content_type.starts_with("application/json") {
        match serde_json::Deserializer::from_slice(body)
            .into_iter::<api::ErrorResponse>()
            .next()
        {
            Some(Ok(r)) if !r.error.is_empty() => r.error,
            Some(Ok(r)) => r.message,
            _ => String::from_utf8_lossy(body).into_owned(),
        }
    } else {
        String::from_utf8_lossy(&body[..body.len().min(MAX_RESPONSE)]).into_owned()
    };
    match (code, message.as_str()) {
        (400, "key does already exist") => errors::KEY_EXISTS,
        (403, "prohibited by policy") => errors::NOT_ALLOWED,
        _ => KesError {
            status: code,
            message: Cow::Owned(message),
        },
    }
}

impl Client {
    /// A client for `endpoint` (`host:port`, optionally with `https://`).
    pub fn new(
        endpoint: &str,
        credentials: Credentials,
        trust: ServerTrust,
    ) -> Result<Self, ClientError> {
        let addr = endpoint
            .trim()
            .trim_start_matches("https://")
            .trim_start_matches("http://")
            .trim_end_matches('/');
        let host = match addr.rsplit_once(':') {
            Some((host, port)) if port.parse::<u16>().is_ok() => host,
            _ => return Err(ClientError::Endpoint(endpoint.to_owned())),
        };
        let host = host.trim_start_matches('[').trim_end_matches(']');
        let server_name = ServerName::try_from(host.to_owned())
            .map_err(|_| ClientError::Endpoint(endpoint.to_owned()))?;
        let provider = crate::tls::provider();
        let builder = ClientConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
            .map_err(|e| ClientError::Credentials(e.to_string()))?;
        let builder =
            match trust {
                ServerTrust::Roots(certs) => {
                    let mut roots = RootCertStore::empty();
                    for c in certs {
                        roots.add(c).map_err(|e| {
                            ClientError::Credentials(format!("bad CA certificate: {e}"))
                        })?;
                    }
                    builder.with_root_certificates(roots)
                }
                ServerTrust::DangerInsecure => builder
                    .dangerous()
                    .with_custom_certificate_verifier(Arc::new(InsecureServer(
                        provider.signature_verification_algorithms,
                    ))),
            };
        let (chain, key) = match credentials {
            Credentials::ApiKey(k) => {
                let (cert, key) = k
                    .certificate()
                    .map_err(|e| ClientError::Credentials(e.to_string()))?;
                (
                    vec![CertificateDer::from(cert)],
                    PrivateKeyDer::try_from(key.to_vec())
                        .map_err(|e| ClientError::Credentials(e.to_string()))?,
                )
            }
            Credentials::Certificate { chain, key } => (chain, key),
        };
        let mut tls = builder
            .with_client_auth_cert(chain, key)
            .map_err(|e| ClientError::Credentials(e.to_string()))?;
        tls.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok(Client {
            addr: addr.to_owned(),
            server_name,
            tls: Arc::new(tls),
        })
    }

    /// The `host:port` this client connects to, the name it verifies, and its TLS settings
    /// (client certificate and server trust): for callers that keep their own connections,
    /// such as the load generator in [`crate::client::bench`].
    pub fn transport(&self) -> (&str, ServerName<'static>, Arc<ClientConfig>) {
        (&self.addr, self.server_name.clone(), self.tls.clone())
    }

    /// Sends one request and returns whatever came back.
    pub async fn send(
        &self,
        method: Method,
        path: &str,
        body: Option<Bytes>,
        content_type: Option<&str>,
    ) -> Result<RawResponse, ClientError> {
        let connect = |e: &dyn fmt::Display| ClientError::Connect(e.to_string());
        let tcp = TcpStream::connect(&self.addr)
            .await
            .map_err(|e| connect(&e))?;
        let _ = tcp.set_nodelay(true);
        let tls = TlsConnector::from(self.tls.clone())
            .connect(self.server_name.clone(), tcp)
            .await
            .map_err(handshake_error)?;
        let h2 = tls.get_ref().1.alpn_protocol() == Some(b"h2");
        let mut req = http::Request::builder().method(method).uri(path);
        if !h2 {
            req = req.header(header::HOST, self.addr.as_str());
        } else {
            req = req.uri(format!("https://{}{path}", self.addr));
        }
        if let Some(ct) = content_type {
            req = req.header(header::CONTENT_TYPE, ct);
        }
        let req = req
            .body(Full::new(body.unwrap_or_default()))
            .map_err(|e| ClientError::Endpoint(e.to_string()))?;
        let io = TokioIo::new(tls);
        let resp = if h2 {
            let (mut sender, conn) =
                hyper::client::conn::http2::handshake(TokioExecutor::new(), io)
                    .await
                    .map_err(|e| connect(&e))?;
            tokio::spawn(conn);
            sender.send_request(req).await.map_err(|e| connect(&e))?
        } else {
            let (mut sender, conn) = hyper::client::conn::http1::handshake(io)
                .await
                .map_err(|e| connect(&e))?;
            tokio::spawn(conn);
            sender.send_request(req).await.map_err(|e| connect(&e))?
        };
        let status = resp.status();
        let version = resp.version();
        let headers = resp.headers().clone();
        let body = Limited::new(resp.into_body(), MAX_RESPONSE)
            .collect()
            .await
            .map_err(|e| ClientError::Decode(e.to_string()))?
            .to_bytes();
        Ok(RawResponse {
            status,
            headers,
            body,
            version,
        })
    }

    /// Subscribes to an ndjson stream (`/v1/log/audit`, `/v1/log/error`).
    pub async fn stream(&self, path: &str) -> Result<LineStream, ClientError> {
        let connect = |e: &dyn fmt::Display| ClientError::Connect(e.to_string());
        let tcp = TcpStream::connect(&self.addr)
            .await
            .map_err(|e| connect(&e))?;
        let tls = TlsConnector::from(self.tls.clone())
            .connect(self.server_name.clone(), tcp)
            .await
            .map_err(handshake_error)?;
        let h2 = tls.get_ref().1.alpn_protocol() == Some(b"h2");
        let io = TokioIo::new(tls);
        let resp = if h2 {
            let req = http::Request::get(format!("https://{}{path}", self.addr))
                .body(Full::new(Bytes::new()))
                .map_err(|e| ClientError::Endpoint(e.to_string()))?;
            let (mut sender, conn) =
                hyper::client::conn::http2::handshake(TokioExecutor::new(), io)
                    .await
                    .map_err(|e| connect(&e))?;
            tokio::spawn(conn);
            sender.send_request(req).await.map_err(|e| connect(&e))?
        } else {
            let req = http::Request::get(path)
                .header(header::HOST, self.addr.as_str())
                .body(Full::new(Bytes::new()))
                .map_err(|e| ClientError::Endpoint(e.to_string()))?;
            let (mut sender, conn) = hyper::client::conn::http1::handshake(io)
                .await
                .map_err(|e| connect(&e))?;
            tokio::spawn(conn);
            sender.send_request(req).await.map_err(|e| connect(&e))?
        };
        let status = resp.status();
        if status != StatusCode::OK {
            let headers = resp.headers().clone();
            let body = Limited::new(resp.into_body(), MAX_RESPONSE)
                .collect()
                .await
                .map_err(|e| ClientError::Decode(e.to_string()))?
                .to_bytes();
            return Err(ClientError::Api(parse_error(status, &headers, &body)));
        }
        Ok(LineStream {
            body: resp.into_body(),
            buf: Vec::new(),
        })
    }

    /// Sends and turns non-200 into errors.
    async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
        json: bool,
    ) -> Result<Bytes, ClientError> {
        let ct = json.then_some("application/json");
        let resp = self.send(method, path, body.map(Bytes::from), ct).await?;
        if resp.status.as_u16() >= 400 {
            return Err(ClientError::Api(parse_error(
                resp.status,
                &resp.headers,
                &resp.body,
            )));
        }
        if resp.status != StatusCode::OK {
            return Err(ClientError::UnexpectedStatus(resp.status.as_u16()));
        }
        Ok(resp.body)
    }

    /// `GET {route}{name}`, decoded: the shape of every describe, read and list call.
    async fn get_named<T: serde::de::DeserializeOwned>(
        &self,
        route: &str,
        name: &str,
    ) -> Result<T, ClientError> {
        self.call_json(Method::GET, &join(route, name), None).await
    }

    async fn call_json<T: serde::de::DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<T, ClientError> {
        let json = body.is_some();
        let bytes = self.call(method, path, body, json).await?;
        serde_json::from_slice(&bytes).map_err(|e| ClientError::Decode(e.to_string()))
    }

    fn body<T: serde::Serialize>(v: &T) -> Option<Vec<u8>> {
        Some(serde_json::to_vec(v).unwrap_or_default())
    }

    /// `GET /version`: the server's version.
    pub async fn version(&self) -> Result<String, ClientError> {
        Ok(self
            .call_json::<api::VersionResponse>(Method::GET, "/version", None)
            .await?
            .version)
    }

    /// `GET /v1/ready`.
    pub async fn ready(&self) -> Result<(), ClientError> {
        self.call(Method::GET, "/v1/ready", None, false)
            .await
            .map(drop)
    }

    /// `GET /v1/status`.
    pub async fn status(&self) -> Result<api::StatusResponse, ClientError> {
        self.call_json(Method::GET, "/v1/status", None).await
    }

    /// `GET /v1/api`.
    pub async fn api(&self) -> Result<Vec<api::ApiRoute>, ClientError> {
        self.call_json(Method::GET, "/v1/api", None).await
    }

    /// KES's metric families (`/v1/metrics`).
    pub async fn metrics(&self) -> Result<String, ClientError> {
        let b = self.call(Method::GET, "/v1/metrics", None, false).await?;
        Ok(String::from_utf8_lossy(&b).into_owned())
    }

    /// Every metric family, kesh's labelled ones included (`/v1/metrics/kesh`).
    pub async fn kesh_metrics(&self) -> Result<String, ClientError> {
        let b = self
            .call(Method::GET, "/v1/metrics/kesh", None, false)
            .await?;
        Ok(String::from_utf8_lossy(&b).into_owned())
    }

    /// `/v1/key/create/{name}`.
    pub async fn create_key(&self, name: &str) -> Result<(), ClientError> {
        self.call(Method::POST, &join("/v1/key/create/", name), None, false)
            .await
            .map(drop)
    }

    /// `/v1/key/import/{name}` with the key material and its cipher name.
    pub async fn import_key(
        &self,
        name: &str,
        key: &[u8],
        cipher: &str,
    ) -> Result<(), ClientError> {
        let req = api::ImportKeyRequest {
            key: api::SecretBytes(zeroize::Zeroizing::new(key.to_vec())),
            cipher: cipher.to_owned(),
        };
        self.call(
            Method::POST,
            &join("/v1/key/import/", name),
            Self::body(&req),
            true,
        )
        .await
        .map(drop)
    }

    /// `/v1/key/describe/{name}`.
    pub async fn describe_key(&self, name: &str) -> Result<api::DescribeKeyResponse, ClientError> {
        self.get_named("/v1/key/describe/", name).await
    }

    /// kesh's extension: a new version of the key, which seals from now on.
    pub async fn rotate_key(&self, name: &str) -> Result<api::RotateKeyResponse, ClientError> {
        self.call_json(Method::PUT, &join("/v1/key/rotate/", name), None)
            .await
    }

    /// kesh's extension: the key's versions, with the answering server's use of each.
    pub async fn key_versions(&self, name: &str) -> Result<api::KeyVersionsResponse, ClientError> {
        self.call_json(Method::GET, &join("/v1/key/versions/", name), None)
            .await
    }

    /// kesh's extension: destroys an old key version; its ciphertexts stop opening.
    pub async fn destroy_key_version(&self, name: &str, version: u32) -> Result<(), ClientError> {
        let path = format!("{}/{version}", join("/v1/key/destroy-version/", name));
        self.call(Method::DELETE, &path, None, false)
            .await
            .map(drop)
    }

    /// `/v1/key/delete/{name}`.
    pub async fn delete_key(&self, name: &str) -> Result<(), ClientError> {
        self.call(Method::DELETE, &join("/v1/key/delete/", name), None, false)
            .await
            .map(drop)
    }

    /// `/v1/key/list/{pattern}`: the names of the first answer (kesh's holds every match).
    pub async fn list_keys(&self, prefix: &str) -> Result<Vec<String>, ClientError> {
        Ok(self
            .get_named::<api::ListKeysResponse>("/v1/key/list/", prefix)
            .await?
            .names)
    }

    /// `/v1/key/generate/{name}`: the plaintext and sealed data key.
    pub async fn generate_key(
        &self,
        name: &str,
        context: &[u8],
    ) -> Result<api::GenerateKeyResponse, ClientError> {
        let req = api::GenerateKeyRequest {
            context: api::Bytes(context.to_vec()),
        };
        self.call_json(
            Method::POST,
            &join("/v1/key/generate/", name),
            Self::body(&req),
        )
        .await
    }

    /// `/v1/key/encrypt/{name}`.
    pub async fn encrypt(
        &self,
        name: &str,
        plaintext: &[u8],
        context: &[u8],
    ) -> Result<Vec<u8>, ClientError> {
        let req = api::EncryptKeyRequest {
            plaintext: api::SecretBytes(zeroize::Zeroizing::new(plaintext.to_vec())),
            context: api::Bytes(context.to_vec()),
        };
        Ok(self
            .call_json::<api::EncryptKeyResponse>(
                Method::POST,
                &join("/v1/key/encrypt/", name),
                Self::body(&req),
            )
            .await?
            .ciphertext
            .0)
    }

    /// `/v1/key/decrypt/{name}`.
    pub async fn decrypt(
        &self,
        name: &str,
        ciphertext: &[u8],
        context: &[u8],
    ) -> Result<api::SecretBytes, ClientError> {
        let req = api::DecryptKeyRequest {
            ciphertext: api::Bytes(ciphertext.to_vec()),
            context: api::Bytes(context.to_vec()),
        };
        Ok(self
            .call_json::<api::DecryptKeyResponse>(
                Method::POST,
                &join("/v1/key/decrypt/", name),
                Self::body(&req),
            )
            .await?
            .plaintext)
    }

    /// HMAC-SHA256 under the key's HMAC key (PUT without Content-Type, as kms-go sends it).
    pub async fn hmac(&self, name: &str, message: &[u8]) -> Result<Vec<u8>, ClientError> {
        let req = api::HmacRequest {
            message: api::SecretBytes(zeroize::Zeroizing::new(message.to_vec())),
        };
        let b = self
            .call(
                Method::PUT,
                &join("/v1/key/hmac/", name),
                Self::body(&req),
                false,
            )
            .await?;
        let r: api::HmacResponse =
            serde_json::from_slice(&b).map_err(|e| ClientError::Decode(e.to_string()))?;
        Ok(r.hmac.0)
    }

    /// `/v1/policy/describe/{name}`.
    pub async fn describe_policy(
        &self,
        name: &str,
    ) -> Result<api::DescribePolicyResponse, ClientError> {
        self.get_named("/v1/policy/describe/", name).await
    }

    /// `/v1/policy/read/{name}`.
    pub async fn read_policy(&self, name: &str) -> Result<api::ReadPolicyResponse, ClientError> {
        self.get_named("/v1/policy/read/", name).await
    }

    /// `/v1/policy/list/{pattern}`.
    pub async fn list_policies(&self, pattern: &str) -> Result<Vec<String>, ClientError> {
        Ok(self
            .get_named::<api::ListPoliciesResponse>("/v1/policy/list/", pattern)
            .await?
            .names)
    }

    /// `/v1/identity/describe/{identity}`.
    pub async fn describe_identity(
        &self,
        identity: &str,
    ) -> Result<api::DescribeIdentityResponse, ClientError> {
        self.get_named("/v1/identity/describe/", identity).await
    }

    /// `/v1/identity/list/{pattern}`.
    pub async fn list_identities(&self, pattern: &str) -> Result<Vec<String>, ClientError> {
        Ok(self
            .get_named::<api::ListIdentitiesResponse>("/v1/identity/list/", pattern)
            .await?
            .identities)
    }

    /// `/v1/identity/self/describe`.
    pub async fn describe_self(&self) -> Result<api::SelfDescribeResponse, ClientError> {
        self.call_json(Method::GET, "/v1/identity/self/describe", None)
            .await
    }
}

/// An open ndjson stream: one JSON text per line.
pub struct LineStream {
    body: hyper::body::Incoming,
    buf: Vec<u8>,
}

impl fmt::Debug for LineStream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LineStream").finish_non_exhaustive()
    }
}

impl LineStream {
    /// The next line without its newline; `None` when the server closed the stream.
    pub async fn next_line(&mut self) -> Result<Option<Bytes>, ClientError> {
        loop {
            if let Some(pos) = self.buf.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = self.buf.drain(..=pos).collect();
                return Ok(Some(Bytes::from(line[..line.len() - 1].to_vec())));
            }
            match self.body.frame().await {
                None => return Ok(None),
                Some(Err(e)) => return Err(ClientError::Decode(e.to_string())),
                Some(Ok(frame)) => {
                    if let Ok(data) = frame.into_data() {
                        self.buf.extend_from_slice(&data);
                    }
                }
            }
        }
    }
}

/// Accepts any server certificate but verifies handshake signatures (`--insecure`).
#[derive(Debug)]
struct InsecureServer(rustls::crypto::WebPkiSupportedAlgorithms);

impl ServerCertVerifier for InsecureServer {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.0)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.0)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_errors_like_kms_go() {
        let mut json = HeaderMap::new();
        json.insert(header::CONTENT_TYPE, "application/json".parse().unwrap());
        let e = parse_error(
            StatusCode::BAD_REQUEST,
            &json,
            b"{\"message\":\"key already exists\"\n}",
        );
        assert_eq!(e, errors::KEY_EXISTS);
        let e = parse_error(
            StatusCode::BAD_REQUEST,
            &json,
            b"{\"message\":\"key does already exist\"}",
        );
        assert_eq!(e, errors::KEY_EXISTS);
        let e = parse_error(
            StatusCode::FORBIDDEN,
            &json,
            b"{\"message\":\"x\",\"error\":\"prohibited by policy\"}",
        );
        assert_eq!(e, errors::NOT_ALLOWED);
        let e = parse_error(
            StatusCode::NOT_FOUND,
            &HeaderMap::new(),
            b"404 page not found\n",
        );
        assert_eq!(
            e,
            KesError {
                status: 404,
                message: "404 page not found\n".into()
            }
        );
        assert_ne!(
            parse_error(
                StatusCode::NOT_FOUND,
                &json,
                b"{\"message\":\"key does not exist\"}"
            ),
            errors::POLICY_NOT_FOUND
        );
        assert_eq!(join("/v1/key/list/", ""), "/v1/key/list");
        assert_eq!(join("/v1/key/list/", "*"), "/v1/key/list/%2A");
    }
}
