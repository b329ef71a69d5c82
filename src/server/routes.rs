//! The 22 routes of the KES API (docs/api.md; KES: `state.go` `initRoutes` at
//! github.com/minio/kes), kesh's `/v1/metrics/kesh`, and their handlers.
//!
//! [`ROUTES`] is the table the dispatcher matches against and `/v1/api` reports: method, path
//! (subtree routes end in `/`), body limit, default timeout, authenticator, and whether the
//! route counts in the HTTP metrics. Handlers parse the resource into a validated name, decode
//! the body, call the one [`Service`](crate::server::service::Service) method and shape the JSON;
//! failures are [`ApiError`]s.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::Duration;

use axum::body::Body;
use axum::response::Response;
use bytes::Bytes;
use http::{header, HeaderValue, Method};

use super::error::{ApiError, BodyKind};
use super::State;
use crate::api::{self, decode_request};
pub use crate::config::server::RouteOverride;
use crate::identity::Identity;
use crate::name::{KeyName, Pattern};
use crate::server::policy::{Permit, PolicyName};
use crate::server::service::KeystoreHealth;

/// Every route of the current KES server.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RouteId {
    /// `GET /version`.
    Version,
    /// `GET /v1/ready`.
    Ready,
    /// `GET /v1/status`.
    Status,
    /// `GET /v1/metrics` (KES's families only).
    Metrics,
    /// kesh's extension: every metric family, labelled ones included (Prometheus).
    KeshMetrics,
    /// `GET /v1/api`.
    Api,
    /// `/v1/key/create/`.
    KeyCreate,
    /// `/v1/key/import/`.
    KeyImport,
    /// `/v1/key/describe/`.
    KeyDescribe,
    /// `/v1/key/list/`.
    KeyList,
    /// `/v1/key/delete/`.
    KeyDelete,
    /// `/v1/key/generate/`.
    KeyGenerate,
    /// `/v1/key/encrypt/`.
    KeyEncrypt,
    /// `/v1/key/decrypt/`.
    KeyDecrypt,
    /// `/v1/key/hmac/`.
    KeyHmac,
    /// `/v1/policy/describe/`.
    PolicyDescribe,
    /// `/v1/policy/read/`.
    PolicyRead,
    /// `/v1/policy/list/`.
    PolicyList,
    /// `/v1/identity/describe/`.
    IdentityDescribe,
    /// `/v1/identity/list/`.
    IdentityList,
    /// `/v1/identity/self/describe`.
    SelfDescribe,
    /// `GET /v1/log/error` (a stream).
    LogError,
    /// `GET /v1/log/audit` (a stream).
    LogAudit,
    /// `PUT`/`POST /v1/key/rotate/<name>` (kesh's extension).
    KeyRotate,
    /// `GET /v1/key/versions/<name>` (kesh's extension).
    KeyVersions,
    /// `DELETE /v1/key/destroy-version/<name>/<N>` (kesh's extension).
    KeyDestroyVersion,
}

/// How a route authenticates its caller (docs/api.md, "Authentication and authorization").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Auth {
    /// No identity computed (`/version`).
    Public,
    /// Identity computed if present; no policy check (self-describe, `skip_auth`).
    IdentifyOnly,
    /// Admin, or a policy that allows the path.
    Verify,
}

/// One row of the route table.
#[derive(Debug, Clone)]
pub struct Route {
    /// Which route.
    pub id: RouteId,
    /// Its method (`PUT` routes accept `POST` too).
    pub method: Method,
    /// Its path; a subtree route ends in `/` and takes the resource after it.
    pub path: &'static str,
    /// Largest body read, in bytes (0: the body is ignored).
    pub max_body: usize,
    /// `None`: no deadline (log streams).
    pub timeout: Option<Duration>,
    /// Its authenticator before the config's `skip_auth`.
    pub auth: Auth,
    /// Counted in `kes_http_*` metrics and audited.
    pub counted: bool,
}

const MB: usize = 1_000_000;
const S10: Option<Duration> = Some(Duration::from_secs(10));
const S15: Option<Duration> = Some(Duration::from_secs(15));

const fn route(
    id: RouteId,
    method: Method,
    path: &'static str,
    max_body: usize,
    timeout: Option<Duration>,
    auth: Auth,
    counted: bool,
) -> Route {
    Route {
        id,
        method,
        path,
        max_body,
        timeout,
        auth,
        counted,
    }
}

/// The route table (`kes:api_test.go` `testListAPIDefaults`), then kesh's extensions.
pub static ROUTES: [Route; 26] = {
    use Auth::*;
    use RouteId::*;
    [
        route(Version, Method::GET, "/version", 0, S10, Public, false),
        route(Ready, Method::GET, "/v1/ready", 0, S15, Verify, false),
        route(Status, Method::GET, "/v1/status", 0, S15, Verify, false),
        route(Metrics, Method::GET, "/v1/metrics", 0, S15, Verify, false),
        route(
            KeshMetrics,
            Method::GET,
            "/v1/metrics/kesh",
            0,
            S15,
            Verify,
            false,
        ),
        route(Api, Method::GET, "/v1/api", 0, S10, Verify, false),
        route(
            KeyCreate,
            Method::PUT,
            "/v1/key/create/",
            0,
            S15,
            Verify,
            true,
        ),
        route(
            KeyImport,
            Method::PUT,
            "/v1/key/import/",
            MB,
            S15,
            Verify,
            true,
        ),
        route(
            KeyDescribe,
            Method::GET,
            "/v1/key/describe/",
            0,
            S15,
            Verify,
            true,
        ),
        route(KeyList, Method::GET, "/v1/key/list/", 0, S15, Verify, true),
        route(
            KeyDelete,
            Method::DELETE,
            "/v1/key/delete/",
            0,
            S15,
            Verify,
            true,
        ),
        route(
            KeyGenerate,
            Method::PUT,
            "/v1/key/generate/",
            MB,
            S15,
            Verify,
            true,
        ),
        route(
            KeyEncrypt,
            Method::PUT,
            "/v1/key/encrypt/",
            MB,
            S15,
            Verify,
            true,
        ),
        route(
            KeyDecrypt,
            Method::PUT,
            "/v1/key/decrypt/",
            MB,
            S15,
            Verify,
            true,
        ),
        route(KeyHmac, Method::PUT, "/v1/key/hmac/", MB, S15, Verify, true),
        route(
            PolicyDescribe,
            Method::GET,
            "/v1/policy/describe/",
            0,
            S15,
            Verify,
            true,
        ),
        route(
            PolicyRead,
            Method::GET,
            "/v1/policy/read/",
            0,
            S15,
            Verify,
            true,
        ),
        route(
            PolicyList,
            Method::GET,
            "/v1/policy/list/",
            0,
            S15,
            Verify,
            true,
        ),
        route(
            IdentityDescribe,
            Method::GET,
            "/v1/identity/describe/",
            0,
            S15,
            Verify,
            true,
        ),
        route(
            IdentityList,
            Method::GET,
            "/v1/identity/list/",
            0,
            S15,
            Verify,
            true,
        ),
        route(
            SelfDescribe,
            Method::GET,
            "/v1/identity/self/describe",
            0,
            S15,
            IdentifyOnly,
            true,
        ),
        route(
            LogError,
            Method::GET,
            "/v1/log/error",
            0,
            None,
            Verify,
            false,
        ),
        route(
            LogAudit,
            Method::GET,
            "/v1/log/audit",
            0,
            None,
            Verify,
            false,
        ),
        route(
            KeyRotate,
            Method::PUT,
            "/v1/key/rotate/",
            0,
            S15,
            Verify,
            true,
        ),
        route(
            KeyVersions,
            Method::GET,
            "/v1/key/versions/",
            0,
            S15,
            Verify,
            true,
        ),
        route(
            KeyDestroyVersion,
            Method::DELETE,
            "/v1/key/destroy-version/",
            0,
            S15,
            Verify,
            true,
        ),
    ]
};

/// Finds the route for a decoded path and the resource after its prefix. A subtree root
/// without its trailing slash (`/v1/key/list`) is served directly with an empty resource
/// instead of the Go mux's 301, which POST-following clients would turn into a GET.
pub fn lookup(path: &str) -> Option<(&'static Route, &str)> {
    ROUTES.iter().find_map(|r| {
        if let Some(root) = r.path.strip_suffix('/') {
            if path == root {
                return Some((r, ""));
            }
            path.strip_prefix(r.path).map(|res| (r, res))
        } else {
            (path == r.path).then_some((r, ""))
        }
    })
}

/// Per-route settings from the config's `api:` section (hsm-config/kesh.yaml).
#[derive(Debug, Clone, Default)]
pub struct RouteSettings {
    timeouts: HashMap<RouteId, Duration>,
    skip_auth: HashSet<RouteId>,
}

impl RouteSettings {
    /// Matches keys verbatim against route paths; unknown paths are ignored with a warning.
    pub fn new(overrides: &BTreeMap<String, RouteOverride>) -> Self {
        let mut s = RouteSettings::default();
        for (path, o) in overrides {
            let Some(r) = ROUTES.iter().find(|r| r.path == path) else {
                tracing::warn!(
                    path,
                    "api: no such route; setting ignored (subtree routes end in '/')"
                );
                continue;
            };
            if o.skip_auth {
                tracing::warn!(path, "api: skip_auth disables authorization on this route and makes client certificates optional for the whole server");
                s.skip_auth.insert(r.id);
            }
            if let Some(t) = o.timeout.filter(|t| !t.is_zero()) {
                s.timeouts.insert(r.id, t);
            }
        }
        s
    }

    /// The route's deadline after the config's override.
    pub fn timeout(&self, r: &Route) -> Option<Duration> {
        self.timeouts.get(&r.id).copied().or(r.timeout)
    }

    /// The route's authenticator after the config's `skip_auth`.
    pub fn auth(&self, r: &Route) -> Auth {
        if r.auth == Auth::Verify && self.skip_auth.contains(&r.id) {
            Auth::IdentifyOnly
        } else {
            r.auth
        }
    }

    /// Whether any route skips auth, which makes client certificates optional.
    pub fn any_skip_auth(&self) -> bool {
        !self.skip_auth.is_empty()
    }
}

/// What a handler gets besides the permit.
pub struct Request {
    /// The path after the route's prefix: a name or pattern, or empty.
    pub resource: String,
    /// The body, read within the route's limit.
    pub body: Bytes,
    /// `Content-Length: 0` was sent, so the body was not parsed (generate's empty context).
    pub empty_body: bool,
}

/// 200 with a JSON body the way Go's `json.Encoder` writes it.
pub fn json<T: serde::Serialize>(value: &T) -> Response {
    with_type(api::encode_response(value), "application/json")
}

/// [`json`] for responses carrying key material: the buffer is zeroized when hyper drops the
/// last reference to it (`Bytes::from_owner` keeps the zeroizing owner).
fn json_secret<T: serde::Serialize>(value: &T) -> Response {
    let body = Bytes::from_owner(api::encode_secret_response(value));
    let mut resp = Response::new(Body::from(body));
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    resp
}

fn with_type(body: Vec<u8>, content_type: &'static str) -> Response {
    let mut resp = Response::new(Body::from(body));
    resp.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    resp
}

/// 200 with no body (`Content-Length: 0`, no Content-Type).
pub fn empty() -> Response {
    let mut resp = Response::new(Body::empty());
    resp.headers_mut()
        .insert(header::CONTENT_LENGTH, HeaderValue::from_static("0"));
    resp
}

/// The server version: the package version and the commit it was built from, if known.
pub fn version() -> api::VersionResponse {
    api::VersionResponse {
        version: env!("CARGO_PKG_VERSION").to_owned(),
        commit: option_env!("KESH_COMMIT").unwrap_or("<unknown>").to_owned(),
    }
}

fn key_name(resource: &str) -> Result<KeyName, ApiError> {
    KeyName::new(resource).map_err(|_| ApiError::InvalidKeyName(resource.to_owned()))
}

/// `<name>/<version>`, the resource of `/v1/key/destroy-version/`.
fn key_and_version(resource: &str) -> Result<(KeyName, u32), ApiError> {
    let (name, version) = resource
        .rsplit_once('/')
        .ok_or_else(|| ApiError::InvalidKeyVersion(resource.to_owned()))?;
    let version = version
        .parse::<u32>()
        .ok()
        .filter(|v| *v >= 1 && version.bytes().all(|b| b.is_ascii_digit()))
        .ok_or_else(|| ApiError::InvalidKeyVersion(resource.to_owned()))?;
    Ok((key_name(name)?, version))
}

fn pattern(resource: &str) -> Result<Pattern, ApiError> {
    Pattern::new(resource).map_err(|_| ApiError::InvalidPattern(resource.to_owned()))
}

fn decode<T: serde::de::DeserializeOwned + Default>(
    body: &[u8],
    kind: BodyKind,
) -> Result<T, ApiError> {
    decode_request(body).map_err(|_| ApiError::InvalidBody(kind))
}

fn patterns(list: &[String]) -> api::PatternSet {
    list.iter().map(|p| (p.clone(), api::Empty {})).collect()
}

/// Go's `GOARCH` name for this machine.
fn go_arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        "x86" => "386",
        "powerpc64" => "ppc64",
        other => other,
    }
}

/// Runs the handler of an authenticated route. `/version` and the log streams are answered
/// by the dispatcher.
pub async fn handle(
    st: &State,
    route: &Route,
    permit: &Permit,
    req: Request,
) -> Result<Response, ApiError> {
    let svc = &st.service;
    let res = req.resource.as_str();
    Ok(match route.id {
        RouteId::Version => json(&version()),
        RouteId::Ready => {
            svc.ready(permit).await?;
            empty()
        }
        RouteId::Status => {
            let health = svc.keystore_health(permit).await;
            let stats = crate::server::metrics::ProcessStats::read();
            let cpus = std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1);
            let (latency, unreachable) = match health {
                KeystoreHealth::Reachable(d) => {
                    (((d.as_micros() + 500) / 1000).max(1) as u64, false)
                }
                KeystoreHealth::Unreachable => (0, true),
            };
            json(&api::StatusResponse {
                version: version().version,
                os: std::env::consts::OS.to_owned(),
                arch: go_arch().to_owned(),
                uptime: svc.uptime().as_secs_f64().round() as u64,
                num_cpu: cpus,
                num_cpu_used: cpus,
                mem_heap_used: stats.heap_bytes,
                mem_stack_used: stats.stack_bytes,
                keystore_latency: latency,
                keystore_unreachable: unreachable,
            })
        }
        RouteId::Metrics => with_type(
            svc.metrics().render_kes().into_bytes(),
            crate::server::metrics::CONTENT_TYPE,
        ),
        RouteId::KeshMetrics => {
            let mut text = svc.metrics().render_all(&svc.keystore_stats());
            text.push_str(&crate::server::metrics::render_version_usage(
                &svc.version_usage(),
            ));
            with_type(text.into_bytes(), crate::server::metrics::CONTENT_TYPE)
        }
        RouteId::Api => {
            let settings = st.routes();
            let list: Vec<api::ApiRoute> = ROUTES
                .iter()
                .map(|r| api::ApiRoute {
                    method: r.method.to_string(),
                    path: r.path.to_owned(),
                    max_body: r.max_body as u64,
                    timeout: settings.timeout(r).map_or(0, |d| d.as_secs()),
                })
                .collect();
            json(&list)
        }
        RouteId::KeyCreate => {
            svc.create_key(permit, &key_name(res)?).await?;
            empty()
        }
        RouteId::KeyImport => {
            let name = key_name(res)?;
            let body: api::ImportKeyRequest = decode(&req.body, BodyKind::Import)?;
            svc.import_key(permit, &name, &body.key.0, &body.cipher)
                .await?;
            empty()
        }
        RouteId::KeyDescribe => {
            let info = svc.describe_key(permit, &key_name(res)?).await?;
            json(&api::DescribeKeyResponse {
                name: info.name.to_string(),
                algorithm: info.algorithm.as_str().to_owned(),
                created_at: info.created_at,
                created_by: info.created_by,
                version: info.version,
            })
        }
        RouteId::KeyList => {
            let names = svc.list_keys(permit, &pattern(res)?).await?;
            json(&api::ListKeysResponse {
                names: names.iter().map(|n| n.to_string()).collect(),
                continue_at: String::new(),
            })
        }
        RouteId::KeyDelete => {
            svc.delete_key(permit, &key_name(res)?).await?;
            empty()
        }
        RouteId::KeyGenerate => {
            let name = key_name(res)?;
            let body: api::GenerateKeyRequest = if req.empty_body {
                Default::default()
            } else {
                decode(&req.body, BodyKind::Other)?
            };
            let dek = svc.generate_key(permit, &name, &body.context.0).await?;
            json_secret(&api::GenerateKeyResponse {
                plaintext: api::SecretBytes(zeroize::Zeroizing::new(dek.plaintext.to_vec())),
                ciphertext: api::Bytes(dek.ciphertext),
            })
        }
        RouteId::KeyEncrypt => {
            let name = key_name(res)?;
            let body: api::EncryptKeyRequest = decode(&req.body, BodyKind::Other)?;
            let ct = svc
                .encrypt(permit, &name, &body.plaintext.0, &body.context.0)
                .await?;
            json(&api::EncryptKeyResponse {
                ciphertext: api::Bytes(ct),
            })
        }
        RouteId::KeyDecrypt => {
            let name = key_name(res)?;
            let body: api::DecryptKeyRequest = decode(&req.body, BodyKind::Other)?;
            let pt = svc
                .decrypt(permit, &name, &body.ciphertext.0, &body.context.0)
                .await?;
            json_secret(&api::DecryptKeyResponse {
                plaintext: api::SecretBytes(pt),
            })
        }
        RouteId::KeyHmac => {
            let name = key_name(res)?;
            let body: api::HmacRequest = decode(&req.body, BodyKind::Other)?;
            let mac = svc.hmac(permit, &name, &body.message.0).await?;
            json(&api::HmacResponse {
                hmac: api::Bytes(mac.to_vec()),
            })
        }
        RouteId::PolicyDescribe | RouteId::PolicyRead => {
            let name =
                PolicyName::new(res).map_err(|_| ApiError::InvalidPolicyName(res.to_owned()))?;
            let view = svc.describe_policy(permit, &name)?;
            if route.id == RouteId::PolicyDescribe {
                json(&api::DescribePolicyResponse {
                    name: view.name.to_string(),
                    created_at: view.created_at,
                    created_by: view.created_by.to_string(),
                })
            } else {
                json(&api::ReadPolicyResponse {
                    name: view.name.to_string(),
                    allow: patterns(&view.policy.allow),
                    deny: patterns(&view.policy.deny),
                    created_at: view.created_at,
                    created_by: view.created_by.to_string(),
                })
            }
        }
        RouteId::PolicyList => {
            let names = svc.list_policies(permit, &pattern(res)?);
            json(&api::ListPoliciesResponse {
                names: names.iter().map(|n| n.to_string()).collect(),
                continue_at: String::new(),
            })
        }
        RouteId::IdentityDescribe => {
            let id = Identity::new(res).map_err(|_| ApiError::InvalidIdentity(res.to_owned()))?;
            let view = svc.describe_identity(permit, &id)?;
            json(&api::DescribeIdentityResponse {
                admin: view.admin,
                policy: view.policy.map(|p| p.to_string()).unwrap_or_default(),
                created_at: view.created_at,
                created_by: view.created_by.map(|i| i.to_string()).unwrap_or_default(),
            })
        }
        RouteId::IdentityList => {
            let ids = svc.list_identities(permit, &pattern(res)?);
            json(&api::ListIdentitiesResponse {
                identities: ids.iter().map(|i| i.to_string()).collect(),
                continue_at: String::new(),
            })
        }
        RouteId::SelfDescribe => {
            let view = svc.describe_self(permit)?;
            let (policy, allow, deny) = match &view.policy {
                Some((name, p)) => (name.to_string(), patterns(&p.allow), patterns(&p.deny)),
                None => Default::default(),
            };
            json(&api::SelfDescribeResponse {
                identity: view.identity.map(|i| i.to_string()).unwrap_or_default(),
                admin: view.admin,
                policy,
                allow,
                deny,
                created_at: view.created_at,
                created_by: view.created_by.map(|i| i.to_string()).unwrap_or_default(),
            })
        }
        RouteId::KeyRotate => {
            let name = key_name(res)?;
            let version = svc.rotate_key(permit, &name).await?;
            json(&api::RotateKeyResponse {
                name: name.to_string(),
                version,
            })
        }
        RouteId::KeyVersions => {
            let name = key_name(res)?;
            let versions = svc.key_versions(permit, &name).await?;
            json(&api::KeyVersionsResponse {
                name: name.to_string(),
                versions: versions
                    .into_iter()
                    .map(|v| api::KeyVersion {
                        version: v.version,
                        created_at: v.created_at,
                        state: v.state.as_str().to_owned(),
                        seals: v.seals,
                        unseals: v.unseals,
                        last_used: v.last_used.as_ref().map(api::rfc3339::format),
                    })
                    .collect(),
            })
        }
        RouteId::KeyDestroyVersion => {
            let (name, version) = key_and_version(res)?;
            svc.destroy_key_version(permit, &name, version).await?;
            empty()
        }
        RouteId::LogError => stream(st.errors.subscribe()),
        RouteId::LogAudit => stream(st.audit.subscribe()),
    })
}

/// An ndjson stream of log lines. Headers go out at once; each line is its own chunk (one
/// flush per event); the stream ends when the client goes away or the log closes.
fn stream(sub: crate::server::audit::Subscription) -> Response {
    let lines = futures_util::stream::unfold(sub, |mut sub| async move {
        sub.next()
            .await
            .map(|line| (Ok::<_, std::convert::Infallible>(line), sub))
    });
    let mut resp = Response::new(Body::from_stream(lines));
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/x-ndjson"),
    );
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lookup_matches_kes_mux() {
        assert_eq!(lookup("/v1/key/list").unwrap().0.id, RouteId::KeyList);
        assert_eq!(lookup("/v1/key/list/").unwrap().1, "");
        assert_eq!(lookup("/v1/key/create/a/b").unwrap().1, "a/b");
        assert_eq!(
            lookup("/v1/identity/self/describe").unwrap().0.id,
            RouteId::SelfDescribe
        );
        assert!(lookup("/v1/identity/self/describe/").is_none());
        assert!(lookup("/version/").is_none());
        assert!(lookup("/v1/unknown").is_none());
        let mut paths: Vec<_> = ROUTES.iter().map(|r| r.path).collect();
        paths.dedup();
        assert_eq!(
            paths.len(),
            26,
            "KES's 22, /v1/metrics/kesh and the three key-version routes"
        );
        assert_eq!(lookup("/v1/key/rotate/k").unwrap().0.id, RouteId::KeyRotate);
        let (r, res) = lookup("/v1/key/destroy-version/k/2").unwrap();
        assert_eq!((r.id, res), (RouteId::KeyDestroyVersion, "k/2"));
        assert_eq!(
            key_and_version("k/2").unwrap(),
            (KeyName::new("k").unwrap(), 2)
        );
        for bad in ["k", "k/", "k/0", "k/+2", "k/x", "/2", "a/b/2"] {
            assert!(key_and_version(bad).is_err(), "{bad}");
        }
        assert_eq!(
            lookup("/v1/metrics/kesh").unwrap().0.id,
            RouteId::KeshMetrics
        );
    }

    #[test]
    fn overrides_apply_verbatim() {
        let mut o = BTreeMap::new();
        o.insert(
            "/v1/status".to_owned(),
            RouteOverride {
                skip_auth: true,
                timeout: Some(Duration::from_secs(3)),
            },
        );
        o.insert(
            "/v1/key/create".to_owned(),
            RouteOverride {
                skip_auth: true,
                timeout: None,
            },
        );
        let s = RouteSettings::new(&o);
        let status = lookup("/v1/status").unwrap().0;
        let create = lookup("/v1/key/create/").unwrap().0;
        assert_eq!(s.auth(status), Auth::IdentifyOnly);
        assert_eq!(s.timeout(status), Some(Duration::from_secs(3)));
        assert_eq!(s.auth(create), Auth::Verify);
        assert!(s.any_skip_auth());
    }
}
