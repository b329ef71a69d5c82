//! KES's `vault` keystore (HashiCorp Vault or OpenBao) as a [`KeySource`].
//!
//! Owns: the `keystore.vault` section of a KES config, one HTTP/1.1 connection to Vault (TLS
//! through rustls, or plain HTTP when the endpoint says so), the login (AppRole, Kubernetes,
//! or a `VAULT_TOKEN` for a config without either), listing and reading KES's entries, and
//! unwrapping transit-encrypted values. Must not touch: the target keystore (the shared code
//! in [`super`] does that), the disk (only the config's CA, client certificate and JWT files
//! are read; nothing is written), and Vault's state (no request writes to Vault except the
//! login and the transit decryption, which change nothing stored).
//!
//! KES's layout, as its vault keystore writes it: the key `<name>` is the secret at
//! `<engine>/<prefix>/<name>` (K/V v1) or `<engine>/data/<prefix>/<name>` (K/V v2, listed
//! through `<engine>/metadata/<prefix>`), paths joined and cleaned like Go's `path.Join`. The
//! secret has one field named after the key whose value is the stored key text of an `fs`
//! file, or, with `transit:` configured, that text encrypted by the transit key
//! (`vault:v1:…`). KES reads version 1 of a K/V v2 secret (it creates with `cas: 0` and never
//! updates), so the migration does too.
//!
//! Secrets (the Vault token, the AppRole secret ID, the JWT, stored key texts, response bodies
//! that carry them) live in zeroizing buffers and never appear in errors, logs or `Debug`.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine;
use bytes::{Buf, Bytes};
use http::{header, HeaderValue, Method, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use rustls::{ClientConfig, RootCertStore};
use serde::de::{self, Deserializer, IgnoredAny, MapAccess, Visitor};
use serde::Deserialize;
use serde_yaml::Value;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use zeroize::{Zeroize, Zeroizing};

use super::{KeySource, MigrateError, ReadError};

/// A listing holds every key name in one response; KES caps it at this size too.
const MAX_RESPONSE: usize = 32 << 20;
/// How long one request (connect, TLS, answer) may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// A token that stops working mid-run (its TTL ran out) is replaced by a new login, at most
/// this often, so a policy that denies every read does not cost a login per key.
const RELOGIN_AFTER: Duration = Duration::from_secs(30);

/// K/V engine version (`vault.version`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KvVersion {
    /// K/V version 1.
    V1,
    /// K/V version 2 (versioned secrets).
    V2,
}

/// How the migration logs in.
#[derive(Debug)]
pub enum Auth {
    /// `vault.approle`: `POST auth/<engine>/login {role_id, secret_id}`.
    AppRole {
        /// The auth mount.
        engine: String,
        /// The namespace to log in to.
        namespace: String,
        /// `role_id`.
        id: String,
        /// `secret_id`.
        secret: Zeroizing<String>,
    },
    /// `vault.kubernetes`: `POST auth/<engine>/login {role, jwt}`; `jwt` is the token or, when
    /// it contains a `/`, the file holding it (as KES decides).
    Kubernetes {
        /// The auth mount.
        engine: String,
        /// The namespace to log in to.
        namespace: String,
        /// The Vault role.
        role: String,
        /// The service-account token, or the file holding it.
        jwt: Zeroizing<String>,
    },
    /// Neither configured: the `VAULT_TOKEN` environment variable (KES itself has no token
    /// option; an operator migrating with their own token needs no AppRole).
    Token(Zeroizing<String>),
}

/// The parts of KES's `keystore.vault` that change how keys are read. `status.ping` and
/// `approle.retry` only matter to a long-running KES and are ignored.
#[derive(Debug)]
pub struct VaultConfig {
    /// `vault.endpoint`.
    pub endpoint: String,
    /// `vault.engine`, the K/V mount.
    pub engine: String,
    /// `vault.version`.
    pub version: KvVersion,
    /// `vault.namespace`.
    pub namespace: String,
    /// `vault.prefix`, under which KES wrote its keys.
    pub prefix: String,
    /// How to log in.
    pub auth: Auth,
    /// `(engine, key)` of `vault.transit`.
    pub transit: Option<(String, String)>,
    /// `vault.tls.key`, for client-certificate login.
    pub tls_key: Option<PathBuf>,
    /// `vault.tls.cert`.
    pub tls_cert: Option<PathBuf>,
    /// `vault.tls.ca`, to verify Vault's certificate.
    pub tls_ca: Option<PathBuf>,
}

/// A scalar of the section as text: YAML reads `prefix: 2024` as a number.
fn scalar(v: &Value, key: &str, at: &str) -> Result<String, String> {
    match v.get(key) {
        None | Some(Value::Null) => Ok(String::new()),
        Some(Value::String(s)) => Ok(s.trim().to_owned()),
        Some(Value::Number(n)) => Ok(n.to_string()),
        Some(Value::Bool(b)) => Ok(b.to_string()),
        Some(_) => Err(format!("keystore.vault.{at}{key}: expected a string")),
    }
}

fn path_of(s: String) -> Option<PathBuf> {
    (!s.is_empty()).then(|| PathBuf::from(s))
}

impl VaultConfig {
    /// Reads the `keystore.vault` section (its `${VAR}`s already substituted). `VAULT_TOKEN`
    /// is read when the section names no login method.
    pub fn from_value(v: &Value) -> Result<Self, String> {
        Self::from_value_with(v, std::env::var("VAULT_TOKEN").ok())
    }

    /// [`Self::from_value`] with the token given, for tests.
    pub fn from_value_with(v: &Value, vault_token: Option<String>) -> Result<Self, String> {
        let vault_token = vault_token.map(Zeroizing::new);
        let endpoint = scalar(v, "endpoint", "")?;
        if endpoint.is_empty() {
            return Err("keystore.vault.endpoint is missing".into());
        }
        let engine = match scalar(v, "engine", "")? {
            e if e.is_empty() => "kv".to_owned(),
            e => e,
        };
        let version = match scalar(v, "version", "")?.as_str() {
            "" | "v1" => KvVersion::V1,
            "v2" => KvVersion::V2,
            other => {
                return Err(format!(
                    "keystore.vault.version: '{other}' is neither 'v1' nor 'v2'"
                ))
            }
        };
        let namespace = scalar(v, "namespace", "")?;
        let prefix = scalar(v, "prefix", "")?;

        let empty = Value::Null;
        let approle = v.get("approle").unwrap_or(&empty);
        let kubernetes = v.get("kubernetes").unwrap_or(&empty);
        let role_id = scalar(approle, "id", "approle.")?;
        let secret_id = Zeroizing::new(scalar(approle, "secret", "approle.")?);
        let k8s_role = scalar(kubernetes, "role", "kubernetes.")?;
        let jwt = Zeroizing::new(scalar(kubernetes, "jwt", "kubernetes.")?);
        let has_approle = !role_id.is_empty() || !secret_id.is_empty();
        let has_k8s = !k8s_role.is_empty() || !jwt.is_empty();
        let auth = match (has_approle, has_k8s) {
            (true, true) => {
                return Err(
                    "keystore.vault: both `approle` and `kubernetes` are configured; \
                            KES refuses that too, keep one"
                        .into(),
                )
            }
            (true, false) => {
                if role_id.is_empty() || secret_id.is_empty() {
                    return Err("keystore.vault.approle needs both `id` and `secret`".into());
                }
                Auth::AppRole {
                    engine: non_empty(scalar(approle, "engine", "approle.")?, "approle"),
                    namespace: scalar(approle, "namespace", "approle.")?,
                    id: role_id,
                    secret: secret_id,
                }
            }
            (false, true) => {
                if k8s_role.is_empty() || jwt.is_empty() {
                    return Err("keystore.vault.kubernetes needs both `role` and `jwt`".into());
                }
                Auth::Kubernetes {
                    engine: non_empty(scalar(kubernetes, "engine", "kubernetes.")?, "kubernetes"),
                    namespace: scalar(kubernetes, "namespace", "kubernetes.")?,
                    role: k8s_role,
                    jwt,
                }
            }
            (false, false) => match vault_token {
                Some(t) if !t.trim().is_empty() => Auth::Token(Zeroizing::new(t.trim().to_owned())),
                _ => {
                    return Err(
                        "keystore.vault names no login method: configure `approle` or \
                                `kubernetes` as for KES, or export VAULT_TOKEN for the migration"
                            .into(),
                    )
                }
            },
        };

        let transit = match v.get("transit") {
            None | Some(Value::Null) => None,
            Some(t) => {
                let key = scalar(t, "key", "transit.")?;
                if key.is_empty() {
                    return Err("keystore.vault.transit.key is missing".into());
                }
                Some((non_empty(scalar(t, "engine", "transit.")?, "transit"), key))
            }
        };
        let tls = v.get("tls").unwrap_or(&empty);
        let tls_key = path_of(scalar(tls, "key", "tls.")?);
        let tls_cert = path_of(scalar(tls, "cert", "tls.")?);
        if tls_key.is_some() != tls_cert.is_some() {
            return Err("keystore.vault.tls: `key` and `cert` go together (mTLS to Vault)".into());
        }
        Ok(VaultConfig {
            endpoint,
            engine,
            version,
            namespace,
            prefix,
            auth,
            transit,
            tls_key,
            tls_cert,
            tls_ca: path_of(scalar(tls, "ca", "tls.")?),
        })
    }

    /// The path that lists the keys.
    pub fn list_path(&self) -> String {
        match self.version {
            KvVersion::V1 => join(&[&self.engine, &self.prefix]),
            KvVersion::V2 => join(&[&self.engine, "metadata", &self.prefix]),
        }
    }

    /// The path that holds key `name`.
    pub fn key_path(&self, name: &str) -> String {
        match self.version {
            KvVersion::V1 => join(&[&self.engine, &self.prefix, name]),
            KvVersion::V2 => join(&[&self.engine, "data", &self.prefix, name]),
        }
    }
}

fn non_empty(s: String, default: &str) -> String {
    if s.is_empty() {
        default.to_owned()
    } else {
        s
    }
}

/// Go's `path.Join` without the leading slash: empty and `.` segments dropped, `..` pops.
pub fn join(parts: &[&str]) -> String {
    let mut out: Vec<&str> = Vec::new();
    for seg in parts.iter().flat_map(|p| p.split('/')) {
        match seg {
            "" | "." => {}
            ".." => {
                out.pop();
            }
            s => out.push(s),
        }
    }
    out.join("/")
}

/// Percent-escapes each segment of a Vault path for the request line.
fn escape_path(path: &str) -> String {
    let mut out = String::with_capacity(path.len());
    for b in path.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~' | b'/') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// A request body that is wiped once sent (a login carries the secret ID or the JWT).
struct SecretBuf {
    data: Zeroizing<Vec<u8>>,
    pos: usize,
}

impl Buf for SecretBuf {
    fn remaining(&self) -> usize {
        self.data.len() - self.pos
    }
    fn chunk(&self) -> &[u8] {
        &self.data[self.pos..]
    }
    fn advance(&mut self, cnt: usize) {
        self.pos = (self.pos + cnt).min(self.data.len());
    }
}

type Body = Full<SecretBuf>;

/// What a request was for: the error messages name the path and the capability.
#[derive(Clone, Copy)]
enum Op<'a> {
    List(&'a str),
    Read(&'a str),
    Decrypt { path: &'a str, key: &'a str },
}

/// The connection settings, kept for reconnecting and for naming certificates in errors.
struct Transport {
    /// As configured, for messages.
    endpoint: String,
    addr: String,
    host: String,
    tls: Option<(Arc<ClientConfig>, ServerName<'static>)>,
    /// Which roots the server certificate is checked against, for messages.
    trust: String,
    client_cert: Option<PathBuf>,
}

/// The first existing system CA bundle, for an endpoint without `tls.ca`.
fn system_roots() -> Option<PathBuf> {
    let candidates = std::env::var_os("SSL_CERT_FILE")
        .map(PathBuf::from)
        .into_iter()
        .chain(
            [
                "/etc/ssl/certs/ca-certificates.crt",
                "/etc/pki/tls/certs/ca-bundle.crt",
                "/etc/ssl/cert.pem",
            ]
            .into_iter()
            .map(PathBuf::from),
        );
    candidates.into_iter().find(|p| p.is_file())
}

impl Transport {
    fn new(cfg: &VaultConfig) -> Result<Self, MigrateError> {
        let bad = || {
            MigrateError(format!(
                "keystore.vault.endpoint '{}' is not an http(s)://host[:port] address",
                cfg.endpoint
            ))
        };
        let uri: http::Uri = cfg.endpoint.parse().map_err(|_| bad())?;
        let https = match uri.scheme_str() {
            Some("https") => true,
            Some("http") => false,
            _ => return Err(bad()),
        };
        let authority = uri.authority().ok_or_else(bad)?;
        let host = authority.host().to_owned();
        let port = authority.port_u16().unwrap_or(if https { 443 } else { 80 });
        let bare_host = host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned();
        let addr = if bare_host.contains(':') {
            format!("[{bare_host}]:{port}")
        } else {
            format!("{bare_host}:{port}")
        };
        let mut trust = String::new();
        let tls = if https {
            let ca = match &cfg.tls_ca {
                Some(ca) => {
                    trust = format!("the CA in '{}' (vault.tls.ca)", ca.display());
                    ca.clone()
                }
                None => {
                    let found = system_roots().ok_or_else(|| {
                        MigrateError(
                            "no CA certificates to verify Vault's certificate: set \
                             keystore.vault.tls.ca"
                                .into(),
                        )
                    })?;
                    trust = format!(
                        "the system CAs in '{}' (set vault.tls.ca to use another CA)",
                        found.display()
                    );
                    found
                }
            };
            let roots: RootCertStore = crate::tls::load_roots(&ca)
                .map_err(|e| MigrateError(format!("keystore.vault.tls.ca: {e}")))?;
            let builder = ClientConfig::builder_with_provider(crate::tls::provider())
                .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
                .map_err(|e| MigrateError(format!("vault: TLS: {e}")))?
                .with_root_certificates(roots);
            let mut config = match (&cfg.tls_cert, &cfg.tls_key) {
                (Some(cert), Some(key)) => {
                    let chain = crate::tls::load_certs(cert)
                        .map_err(|e| MigrateError(format!("keystore.vault.tls.cert: {e}")))?;
                    let key = crate::tls::load_key(key)
                        .map_err(|e| MigrateError(format!("keystore.vault.tls.key: {e}")))?;
                    builder.with_client_auth_cert(chain, key).map_err(|e| {
                        MigrateError(format!(
                            "keystore.vault.tls: the client certificate '{}' and its key do \
                             not go together: {e}",
                            cert.display()
                        ))
                    })?
                }
                _ => builder.with_no_client_auth(),
            };
            config.alpn_protocols = vec![b"http/1.1".to_vec()];
            let name = ServerName::try_from(bare_host.clone()).map_err(|_| bad())?;
            Some((Arc::new(config), name))
        } else {
            None
        };
        Ok(Transport {
            endpoint: cfg.endpoint.clone(),
            addr,
            host: authority.as_str().to_owned(),
            tls,
            trust,
            client_cert: cfg.tls_cert.clone(),
        })
    }

    /// A failed TLS handshake or TLS read, saying which certificate is at fault.
    fn tls_error(&self, e: &(dyn std::error::Error + 'static)) -> String {
        let mut source: Option<&(dyn std::error::Error + 'static)> = Some(e);
        while let Some(err) = source {
            if let Some(tls) = err.downcast_ref::<rustls::Error>() {
                return match tls {
                    rustls::Error::InvalidCertificate(why) => format!(
                        "Vault's TLS certificate at {} is not trusted ({why:?}); it was checked \
                         against {}",
                        self.endpoint, self.trust
                    ),
                    rustls::Error::AlertReceived(alert) => match &self.client_cert {
                        Some(cert) => format!(
                            "Vault at {} refused the TLS handshake ({alert:?}): it does not \
                             accept the client certificate '{}' (vault.tls.cert)",
                            self.endpoint,
                            cert.display()
                        ),
                        None => format!(
                            "Vault at {} refused the TLS handshake ({alert:?}): if it asks for \
                             a client certificate, set vault.tls.cert and vault.tls.key",
                            self.endpoint
                        ),
                    },
                    other => format!("TLS with Vault at {} failed: {other}", self.endpoint),
                };
            }
            // An io::Error's `source()` skips the error it wraps.
            source = match err.downcast_ref::<std::io::Error>() {
                Some(io) => io
                    .get_ref()
                    .map(|inner| inner as &(dyn std::error::Error + 'static)),
                None => err.source(),
            };
        }
        format!("cannot reach Vault at {}: {e}", self.endpoint)
    }

    async fn connect(&self) -> Result<SendRequest<Body>, String> {
        let tcp = TcpStream::connect(&self.addr)
            .await
            .map_err(|e| format!("cannot reach Vault at {}: {e}", self.endpoint))?;
        let _ = tcp.set_nodelay(true);
        match &self.tls {
            Some((config, name)) => {
                let tls = TlsConnector::from(config.clone())
                    .connect(name.clone(), tcp)
                    .await
                    .map_err(|e| self.tls_error(&e))?;
                let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
                    .await
                    .map_err(|e| self.tls_error(&e))?;
                tokio::spawn(conn);
                Ok(sender)
            }
            None => {
                let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
                    .await
                    .map_err(|e| format!("cannot reach Vault at {}: {e}", self.endpoint))?;
                tokio::spawn(conn);
                Ok(sender)
            }
        }
    }
}

/// A response: status and a body that is wiped when dropped.
struct Response {
    status: StatusCode,
    body: Zeroizing<Vec<u8>>,
}

/// The Vault API over one kept-alive connection.
struct Api {
    transport: Transport,
    conn: Option<SendRequest<Body>>,
    token: Option<Zeroizing<String>>,
}

impl Api {
    /// Sends one request; a kept-alive connection Vault closed meanwhile is replaced once.
    async fn send(
        &mut self,
        method: Method,
        path_and_query: &str,
        body: Option<Zeroizing<Vec<u8>>>,
        namespace: &str,
    ) -> Result<Response, String> {
        let attempt = tokio::time::timeout(
            REQUEST_TIMEOUT,
            self.send_once(method.clone(), path_and_query, body.clone(), namespace),
        )
        .await;
        match attempt {
            Ok(Ok(r)) => Ok(r),
            Ok(Err((reused, e))) if reused => {
                self.conn = None;
                tokio::time::timeout(
                    REQUEST_TIMEOUT,
                    self.send_once(method, path_and_query, body, namespace),
                )
                .await
                .map_err(|_| self.timeout())?
                .map_err(|(_, e2)| format!("{e}; again on a new connection: {e2}"))
            }
            Ok(Err((_, e))) => Err(e),
            Err(_) => {
                self.conn = None;
                Err(self.timeout())
            }
        }
    }

    fn timeout(&self) -> String {
        format!(
            "Vault at {} did not answer within {} s",
            self.transport.endpoint,
            REQUEST_TIMEOUT.as_secs()
        )
    }

    /// One try; the error says whether it went over a reused connection.
    async fn send_once(
        &mut self,
        method: Method,
        path_and_query: &str,
        body: Option<Zeroizing<Vec<u8>>>,
        namespace: &str,
    ) -> Result<Response, (bool, String)> {
        let mut kept = self.conn.take();
        if let Some(s) = &mut kept {
            if s.is_closed() || s.ready().await.is_err() {
                kept = None;
            }
        }
        let reused = kept.is_some();
        let mut sender = match kept {
            Some(s) => s,
            None => self.transport.connect().await.map_err(|e| (false, e))?,
        };
        let mut req = http::Request::builder()
            .method(method)
            .uri(path_and_query)
            .header(header::HOST, self.transport.host.as_str())
            .header("X-Vault-Request", "true");
        if let Some(token) = &self.token {
            let mut value = HeaderValue::from_str(token).map_err(|_| {
                (
                    false,
                    "the Vault token is not a valid header value".to_owned(),
                )
            })?;
            value.set_sensitive(true);
            req = req.header("X-Vault-Token", value);
        }
        if !namespace.is_empty() {
            req = req.header("X-Vault-Namespace", namespace);
        }
        if body.is_some() {
            req = req.header(header::CONTENT_TYPE, "application/json");
        }
        let req = req
            .body(Full::new(SecretBuf {
                data: body.unwrap_or_default(),
                pos: 0,
            }))
            .map_err(|e| (false, format!("vault: bad request: {e}")))?;
        let resp = sender
            .send_request(req)
            .await
            .map_err(|e| (reused, self.transport.tls_error(&e)))?;
        let status = resp.status();
        let mut body = resp.into_body();
        let mut collected = Zeroizing::new(Vec::new());
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|e| (false, self.transport.tls_error(&e)))?;
            if let Ok(data) = frame.into_data() {
                if collected.len() + data.len() > MAX_RESPONSE {
                    return Err((
                        false,
                        format!("Vault's answer is larger than {MAX_RESPONSE} bytes"),
                    ));
                }
                collected.extend_from_slice(&data);
                wipe_bytes(data);
            }
        }
        // A body hyper read to its end leaves the connection reusable.
        self.conn = Some(sender);
        Ok(Response {
            status,
            body: collected,
        })
    }
}

/// Wipes a received chunk when nothing else holds it.
fn wipe_bytes(data: Bytes) {
    if let Ok(mut owned) = data.try_into_mut() {
        owned.zeroize();
    }
}

/// Vault's `{"errors": [...]}`, flattened to one line ("1 error occurred: * permission
/// denied" becomes "permission denied").
fn vault_errors(body: &[u8]) -> String {
    #[derive(Deserialize)]
    struct Errors {
        #[serde(default)]
        errors: Vec<String>,
    }
    match serde_json::from_slice::<Errors>(body) {
        Ok(e) if !e.errors.is_empty() => e
            .errors
            .iter()
            .map(|m| {
                let m = m.trim();
                let m = match m.split_once("error occurred:") {
                    Some((_, rest)) => rest,
                    None => m,
                };
                m.split_whitespace()
                    .filter(|w| *w != "*")
                    .collect::<Vec<_>>()
                    .join(" ")
            })
            .collect::<Vec<_>>()
            .join("; "),
        Ok(_) => String::new(),
        Err(_) => String::from_utf8_lossy(&body[..body.len().min(200)])
            .trim()
            .to_owned(),
    }
}

/// One field of a secret's data: a string (kept zeroizing) or anything else.
enum Field {
    Text(Zeroizing<String>),
    Other,
}

impl<'de> Deserialize<'de> for Field {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Field;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("any value")
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<Field, E> {
                Ok(Field::Text(Zeroizing::new(s.to_owned())))
            }
            fn visit_string<E: de::Error>(self, s: String) -> Result<Field, E> {
                Ok(Field::Text(Zeroizing::new(s)))
            }
            fn visit_bool<E: de::Error>(self, _: bool) -> Result<Field, E> {
                Ok(Field::Other)
            }
            fn visit_i64<E: de::Error>(self, _: i64) -> Result<Field, E> {
                Ok(Field::Other)
            }
            fn visit_u64<E: de::Error>(self, _: u64) -> Result<Field, E> {
                Ok(Field::Other)
            }
            fn visit_f64<E: de::Error>(self, _: f64) -> Result<Field, E> {
                Ok(Field::Other)
            }
            fn visit_unit<E: de::Error>(self) -> Result<Field, E> {
                Ok(Field::Other)
            }
            fn visit_none<E: de::Error>(self) -> Result<Field, E> {
                Ok(Field::Other)
            }
            fn visit_seq<A: de::SeqAccess<'de>>(self, mut a: A) -> Result<Field, A::Error> {
                while a.next_element::<IgnoredAny>()?.is_some() {}
                Ok(Field::Other)
            }
            fn visit_map<A: MapAccess<'de>>(self, mut a: A) -> Result<Field, A::Error> {
                while a.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
                Ok(Field::Other)
            }
        }
        d.deserialize_any(V)
    }
}

/// A secret's fields, by name.
type Fields = Vec<(String, Field)>;

/// Reads a JSON object into [`Fields`] without copying values into plain strings.
struct FieldsOf(Option<Fields>);

impl<'de> Deserialize<'de> for FieldsOf {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = FieldsOf;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("an object or null")
            }
            fn visit_unit<E: de::Error>(self) -> Result<FieldsOf, E> {
                Ok(FieldsOf(None))
            }
            fn visit_none<E: de::Error>(self) -> Result<FieldsOf, E> {
                Ok(FieldsOf(None))
            }
            fn visit_map<A: MapAccess<'de>>(self, mut a: A) -> Result<FieldsOf, A::Error> {
                let mut fields = Vec::new();
                while let Some((k, v)) = a.next_entry::<String, Field>()? {
                    fields.push((k, v));
                }
                Ok(FieldsOf(Some(fields)))
            }
        }
        d.deserialize_any(V)
    }
}

#[derive(Deserialize)]
struct DataV1 {
    data: FieldsOf,
}

#[derive(Deserialize)]
struct DataV2 {
    data: Inner,
}

#[derive(Deserialize)]
struct Inner {
    data: FieldsOf,
}

#[derive(Deserialize)]
struct Listing {
    data: Keys,
}

#[derive(Deserialize)]
struct Keys {
    keys: Vec<String>,
}

#[derive(Deserialize)]
struct Login {
    auth: LoginAuth,
}

#[derive(Deserialize)]
struct LoginAuth {
    client_token: Field,
}

#[derive(Deserialize)]
struct Decrypted {
    data: Plaintext,
}

#[derive(Deserialize)]
struct Plaintext {
    plaintext: Field,
}

/// KES's Vault keystore, logged in.
pub struct VaultSource {
    cfg: VaultConfig,
    api: Api,
    logged_in: Instant,
}

impl fmt::Debug for VaultSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("VaultSource")
            .field("endpoint", &self.cfg.endpoint)
            .finish_non_exhaustive()
    }
}

impl VaultSource {
    /// Connects and logs in; fails with what to fix (credentials, TLS, a sealed Vault).
    pub async fn connect(cfg: VaultConfig) -> Result<Self, MigrateError> {
        let transport = Transport::new(&cfg)?;
        let mut source = VaultSource {
            api: Api {
                transport,
                conn: None,
                token: None,
            },
            cfg,
            logged_in: Instant::now(),
        };
        source.login().await.map_err(MigrateError)?;
        Ok(source)
    }

    async fn login(&mut self) -> Result<(), String> {
        let (engine, namespace, body, what) = match &self.cfg.auth {
            Auth::Token(token) => {
                self.api.token = Some(token.clone());
                self.logged_in = Instant::now();
                return Ok(());
            }
            Auth::AppRole {
                engine,
                namespace,
                id,
                secret,
            } => {
                let body = serde_json::to_vec(&serde_json::json!({
                    "role_id": id,
                    "secret_id": secret.as_str(),
                }))
                .map(Zeroizing::new)
                .map_err(|e| e.to_string())?;
                (engine, namespace, body, "AppRole")
            }
            Auth::Kubernetes {
                engine,
                namespace,
                role,
                jwt,
            } => {
                let jwt = if jwt.contains('/') {
                    let path = Path::new(jwt.as_str());
                    Zeroizing::new(
                        std::fs::read_to_string(path)
                            .map_err(|e| {
                                format!(
                                    "cannot read the Kubernetes service account token '{}' \
                                     (vault.kubernetes.jwt): {e}",
                                    path.display()
                                )
                            })?
                            .trim()
                            .to_owned(),
                    )
                } else {
                    jwt.clone()
                };
                let body = serde_json::to_vec(&serde_json::json!({
                    "role": role,
                    "jwt": jwt.as_str(),
                }))
                .map(Zeroizing::new)
                .map_err(|e| e.to_string())?;
                (engine, namespace, body, "Kubernetes")
            }
        };
        // KES: a login namespace of "/" is the root namespace; none is the store's.
        let namespace = match namespace.as_str() {
            "/" => String::new(),
            "" => self.cfg.namespace.clone(),
            ns => ns.to_owned(),
        };
        let path = join(&["auth", engine, "login"]);
        self.api.token = None;
        let resp = self
            .api
            .send(
                Method::POST,
                &format!("/v1/{}", escape_path(&path)),
                Some(body),
                &namespace,
            )
            .await?;
        if resp.status != StatusCode::OK {
            let errors = vault_errors(&resp.body);
            if let Some(sealed) = self.sealed(resp.status, &errors) {
                return Err(sealed);
            }
            let hint = match what {
                "AppRole" => "check vault.approle.id and vault.approle.secret",
                _ => "check vault.kubernetes.role and vault.kubernetes.jwt",
            };
            return Err(format!(
                "{what} login at '{path}' on {} failed: {} ({}): {hint}",
                self.cfg.endpoint,
                if errors.is_empty() {
                    "no reason given"
                } else {
                    &errors
                },
                resp.status.as_u16()
            ));
        }
        let login: Login = serde_json::from_slice(&resp.body)
            .map_err(|e| format!("{what} login at '{path}': unexpected answer: {e}"))?;
        match login.auth.client_token {
            Field::Text(token) if !token.is_empty() => {
                self.api.token = Some(token);
                self.logged_in = Instant::now();
                Ok(())
            }
            _ => Err(format!("{what} login at '{path}': Vault returned no token")),
        }
    }

    fn sealed(&self, status: StatusCode, errors: &str) -> Option<String> {
        (status == StatusCode::SERVICE_UNAVAILABLE && errors.contains("sealed")).then(|| {
            format!(
                "Vault at {} is sealed: unseal it (`vault operator unseal` or `bao operator \
                 unseal`) and rerun",
                self.cfg.endpoint
            )
        })
    }

    /// A request with the token; a 403 after the token may have expired logs in again once.
    async fn call(
        &mut self,
        method: Method,
        path: &str,
        query: &str,
        body: Option<Zeroizing<Vec<u8>>>,
    ) -> Result<Response, String> {
        let uri = format!("/v1/{}{query}", escape_path(path));
        let namespace = self.cfg.namespace.clone();
        let resp = self
            .api
            .send(method.clone(), &uri, body.clone(), &namespace)
            .await?;
        if resp.status == StatusCode::FORBIDDEN
            && !matches!(self.cfg.auth, Auth::Token(_))
            && self.logged_in.elapsed() > RELOGIN_AFTER
        {
            self.login().await?;
            return self.api.send(method, &uri, body, &namespace).await;
        }
        Ok(resp)
    }

    /// The message for a failed request, naming the path and what the policy lacks.
    fn failure(&self, op: Op<'_>, resp: &Response) -> String {
        let errors = vault_errors(&resp.body);
        if let Some(sealed) = self.sealed(resp.status, &errors) {
            return sealed;
        }
        let status = resp.status.as_u16();
        let token_hint = match self.cfg.auth {
            Auth::Token(_) => " (or VAULT_TOKEN is invalid or expired)",
            _ => "",
        };
        match (op, resp.status) {
            (Op::List(path), StatusCode::FORBIDDEN) => format!(
                "permission denied listing '{path}': the Vault policy needs the \"list\" \
                 capability on \"{path}\"{token_hint}"
            ),
            (Op::Read(path), StatusCode::FORBIDDEN) => format!(
                "permission denied reading '{path}': the Vault policy needs the \"read\" \
                 capability on \"{path}\"{token_hint}"
            ),
            (Op::Decrypt { path, key }, StatusCode::FORBIDDEN) => format!(
                "permission denied using the transit key '{key}': the Vault policy needs the \
                 \"update\" capability on \"{path}\"{token_hint}"
            ),
            (Op::Decrypt { path, key }, StatusCode::BAD_REQUEST)
                if errors.contains("key not found") =>
            {
                format!("the transit key '{key}' does not exist ('{path}': {errors})")
            }
            (Op::Decrypt { path, key }, _) => format!(
                "the transit key '{key}' cannot decrypt this entry ('{path}': {errors} \
                 ({status})): is vault.transit.key the key KES used?"
            ),
            (Op::Read(path), StatusCode::NOT_FOUND) => match self.cfg.version {
                KvVersion::V1 => format!("'{path}' is gone (deleted while migrating?)"),
                KvVersion::V2 => {
                    format!("version 1 of '{path}', the one KES reads, is deleted or destroyed")
                }
            },
            (Op::List(path) | Op::Read(path), _) => {
                format!("Vault answered {status} for '{path}': {errors}")
            }
        }
    }

    async fn transit_decrypt(
        &mut self,
        location: &str,
        ciphertext: &str,
    ) -> Result<Zeroizing<Vec<u8>>, String> {
        let Some((engine, key)) = self.cfg.transit.clone() else {
            return Err(format!(
                "'{location}' is encrypted by a Vault transit key (vault:v…), but \
                 keystore.vault.transit is not configured: add the `transit:` section KES used"
            ));
        };
        let path = join(&[&engine, "decrypt", &key]);
        let body = serde_json::to_vec(&serde_json::json!({ "ciphertext": ciphertext }))
            .map(Zeroizing::new)
            .map_err(|e| e.to_string())?;
        let resp = self.call(Method::POST, &path, "", Some(body)).await?;
        if resp.status != StatusCode::OK {
            return Err(self.failure(
                Op::Decrypt {
                    path: &path,
                    key: &key,
                },
                &resp,
            ));
        }
        let decrypted: Decrypted = serde_json::from_slice(&resp.body)
            .map_err(|e| format!("transit decrypt at '{path}': unexpected answer: {e}"))?;
        let Field::Text(b64) = decrypted.data.plaintext else {
            return Err(format!(
                "transit decrypt at '{path}': no plaintext in the answer"
            ));
        };
        base64::engine::general_purpose::STANDARD
            .decode(b64.as_bytes())
            .map(Zeroizing::new)
            .map_err(|_| format!("transit decrypt at '{path}': the plaintext is not base64"))
    }
}

/// `vault:v<N>:` — the transit engine's ciphertext prefix (KES writes `vault:v1:`; a rotated
/// transit key gives a higher N).
fn is_transit(value: &str) -> bool {
    value
        .strip_prefix("vault:v")
        .and_then(|rest| rest.split_once(':'))
        .is_some_and(|(n, _)| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
}

#[async_trait::async_trait]
impl KeySource for VaultSource {
    fn description(&self) -> String {
        format!(
            "Vault {} K/V {} '{}'",
            self.cfg.endpoint,
            match self.cfg.version {
                KvVersion::V1 => "v1",
                KvVersion::V2 => "v2",
            },
            self.cfg.list_path()
        )
    }

    async fn names(&mut self) -> Result<Vec<String>, MigrateError> {
        let path = self.cfg.list_path();
        let resp = self
            .call(Method::GET, &path, "?list=true", None)
            .await
            .map_err(MigrateError)?;
        // Vault answers 404 when nothing was ever written under the path.
        if resp.status == StatusCode::NOT_FOUND {
            return Ok(Vec::new());
        }
        if resp.status != StatusCode::OK {
            return Err(MigrateError(self.failure(Op::List(&path), &resp)));
        }
        let listing: Listing = serde_json::from_slice(&resp.body).map_err(|e| {
            MigrateError(format!(
                "listing '{path}': unexpected answer ({e}): is keystore.vault.version right?"
            ))
        })?;
        let mut names = listing.data.keys;
        names.sort();
        Ok(names)
    }

    async fn read(&mut self, name: &str) -> Result<Zeroizing<Vec<u8>>, ReadError> {
        if name.ends_with('/') {
            return Err(ReadError::NotAKey(
                "a folder, not a key (KES keeps its keys directly under the prefix)".into(),
            ));
        }
        let path = self.cfg.key_path(name);
        let query = match self.cfg.version {
            KvVersion::V1 => "",
            KvVersion::V2 => "?version=1",
        };
        let resp = self
            .call(Method::GET, &path, query, None)
            .await
            .map_err(ReadError::Failed)?;
        if resp.status != StatusCode::OK {
            return Err(ReadError::Failed(self.failure(Op::Read(&path), &resp)));
        }
        let not_kes = |why: String| ReadError::Failed(format!("not a KES key: {why}"));
        let fields = match self.cfg.version {
            KvVersion::V1 => serde_json::from_slice::<DataV1>(&resp.body).map(|d| d.data.0),
            KvVersion::V2 => serde_json::from_slice::<DataV2>(&resp.body).map(|d| d.data.data.0),
        }
        .map_err(|e| not_kes(format!("'{path}' is not a K/V {query} secret: {e}")))?
        .unwrap_or_default();
        drop(resp);
        let mut value = None;
        let mut others = Vec::new();
        for (field, v) in fields {
            if field == name {
                value = Some(v);
            } else {
                others.push(field);
            }
        }
        let text = match value {
            Some(Field::Text(text)) => text,
            Some(Field::Other) => {
                return Err(not_kes(format!(
                    "the field '{name}' of '{path}' is not a string"
                )))
            }
            None => {
                return Err(not_kes(format!(
                    "'{path}' has no field named '{name}' (KES stores a key in a field named \
                     after it){}",
                    if others.is_empty() {
                        String::new()
                    } else {
                        format!("; its fields: {}", others.join(", "))
                    }
                )))
            }
        };
        if is_transit(&text) {
            return self
                .transit_decrypt(&path, &text)
                .await
                .map_err(ReadError::Failed);
        }
        let mut text = text;
        Ok(Zeroizing::new(std::mem::take(&mut *text).into_bytes()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(yaml: &str, token: Option<&str>) -> Result<VaultConfig, String> {
        let v: Value = serde_yaml::from_str(yaml).unwrap();
        VaultConfig::from_value_with(&v, token.map(str::to_owned))
    }

    #[test]
    fn paths_follow_kes() {
        let c = cfg(
            "endpoint: https://v:8200\nengine: /secrets/\nversion: v2\nprefix: /tenant-1//a/\napprole: {id: a, secret: b}\n",
            None,
        )
        .unwrap();
        assert_eq!(c.list_path(), "secrets/metadata/tenant-1/a");
        assert_eq!(c.key_path("k"), "secrets/data/tenant-1/a/k");
        let c = cfg("endpoint: http://v\n", Some("t")).unwrap();
        assert_eq!(c.list_path(), "kv");
        assert_eq!(c.key_path("k"), "kv/k");
        assert!(matches!(c.auth, Auth::Token(_)));
    }

    #[test]
    fn config_errors_say_what_to_fix() {
        let both =
            "endpoint: https://v\napprole: {id: a, secret: b}\nkubernetes: {role: r, jwt: j}\n";
        assert!(cfg(both, None).unwrap_err().contains("both"));
        assert!(cfg("endpoint: https://v\n", None)
            .unwrap_err()
            .contains("VAULT_TOKEN"));
        assert!(cfg("endpoint: https://v\nversion: v3\n", Some("t"))
            .unwrap_err()
            .contains("v3"));
        assert!(
            cfg("endpoint: https://v\ntransit: {engine: t}\n", Some("t"))
                .unwrap_err()
                .contains("transit.key")
        );
    }

    #[test]
    fn secrets_stay_out_of_debug() {
        let c = cfg(
            "endpoint: https://v\napprole: {id: role, secret: s3cr3t-id}\n",
            None,
        )
        .unwrap();
        assert!(!format!("{c:?}").contains("s3cr3t-id"));
        let c = cfg("endpoint: https://v\n", Some("hvs.t0ken")).unwrap();
        assert!(!format!("{c:?}").contains("t0ken"));
    }

    #[test]
    fn transit_prefix() {
        assert!(is_transit("vault:v1:abc"));
        assert!(is_transit("vault:v12:abc"));
        assert!(!is_transit("vault:vx:abc"));
        assert!(!is_transit("CiQKIMiH"));
    }

    #[test]
    fn vault_errors_are_one_line() {
        let b = br#"{"errors":["1 error occurred:\n\t* permission denied\n\n"]}"#;
        assert_eq!(vault_errors(b), "permission denied");
        assert_eq!(
            vault_errors(br#"{"errors":["Vault is sealed"]}"#),
            "Vault is sealed"
        );
    }
}
