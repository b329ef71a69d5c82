//! The one error → HTTP mapping (docs/api.md, "Errors"; KES:
//! `internal/api/error.go` at github.com/minio/kes; the typed errors MinIO matches: `kes/error.go`
//! at github.com/minio/kms-go).
//!
//! Every failure a handler can meet becomes an [`ApiError`]; its [`IntoResponse`] holds the
//! whole status/message table. Bodies are byte-exact `{"message":"..."\n}` with
//! `Content-Type: application/json`. No code anywhere branches on message text.

use axum::body::Body;
use axum::response::{IntoResponse, Response};
use http::{header, HeaderValue, Method, StatusCode};

use crate::api;
use crate::keystore::KeystoreError;
use crate::server::service::{KeyOp, ServiceError};

/// Which request body could not be decoded; import words it differently.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyKind {
    /// The import route's body.
    Import,
    /// Any other route's body.
    Other,
}

/// A failed request, before it becomes a response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ApiError {
    /// Wrong method for the route (`POST` on `PUT` routes is not wrong).
    MethodNotAllowed {
        /// The method the request used.
        got: Method,
        /// The method the route takes.
        want: Method,
    },
    /// A key name that is empty, too long or has invalid characters.
    InvalidKeyName(String),
    /// A listing pattern that is empty, too long or invalid.
    InvalidPattern(String),
    /// A policy name that is empty, too long or has invalid characters.
    InvalidPolicyName(String),
    /// An identity that is empty, too long or has invalid characters.
    InvalidIdentity(String),
    /// A body that does not decode, or is too large.
    InvalidBody(BodyKind),
    /// kesh's `/v1/key/destroy-version/<name>/<version>` without a valid `<version>`.
    InvalidKeyVersion(String),
    /// The client sent more than one end-entity certificate.
    MultipleCertificates,
    /// What the service refused or failed at.
    Service(ServiceError),
}

impl From<ServiceError> for ApiError {
    fn from(e: ServiceError) -> Self {
        ApiError::Service(e)
    }
}

/// The message of a keystore failure, by operation (docs/api.md, "Errors").
fn backend_failure(op: KeyOp) -> (StatusCode, &'static str) {
    match op {
        KeyOp::Create | KeyOp::Import => (StatusCode::BAD_GATEWAY, "failed to create key"),
        KeyOp::Describe | KeyOp::Hmac => (StatusCode::BAD_GATEWAY, "failed to read key"),
        KeyOp::List => (StatusCode::BAD_GATEWAY, "failed to list keys"),
        KeyOp::Delete => (StatusCode::BAD_GATEWAY, "failed to delete key"),
        KeyOp::Generate => (
            StatusCode::INTERNAL_SERVER_ERROR,
            "failed to generate encryption key",
        ),
        KeyOp::Encrypt => (
            StatusCode::INTERNAL_SERVER_ERROR,
            "failed to encrypt plaintext",
        ),
        KeyOp::Decrypt => (
            StatusCode::INTERNAL_SERVER_ERROR,
            "failed to decrypt ciphertext",
        ),
        KeyOp::Status => (StatusCode::BAD_GATEWAY, "key store is unavailable"),
        KeyOp::Rotate => (StatusCode::BAD_GATEWAY, "failed to rotate key"),
        KeyOp::Versions => (StatusCode::BAD_GATEWAY, "failed to read key"),
        KeyOp::DestroyVersion => (StatusCode::BAD_GATEWAY, "failed to delete key version"),
    }
}

impl ApiError {
    /// The status and exact message.
    pub fn status_and_message(&self) -> (StatusCode, String) {
        use ServiceError as S;
        let fixed = |status: StatusCode, msg: &str| (status, msg.to_owned());
        match self {
            ApiError::MethodNotAllowed { got, want } => (
                StatusCode::METHOD_NOT_ALLOWED,
                format!("received method '{got}' expected '{want}'"),
            ),
            ApiError::InvalidKeyName(n) => invalid_name("key name", n),
            ApiError::InvalidPattern(p) => (
                StatusCode::BAD_REQUEST,
                format!("listing pattern '{p}' is empty, too long or is invalid"),
            ),
            ApiError::InvalidPolicyName(n) => invalid_name("policy name", n),
            ApiError::InvalidIdentity(i) => invalid_name("identity", i),
            ApiError::InvalidKeyVersion(r) => (
                StatusCode::BAD_REQUEST,
                format!("'{r}' is not <key name>/<key version>"),
            ),
            ApiError::InvalidBody(BodyKind::Import) => {
                fixed(StatusCode::BAD_REQUEST, "invalid import key request body")
            }
            ApiError::InvalidBody(BodyKind::Other) => {
                fixed(StatusCode::BAD_REQUEST, "invalid request body")
            }
            ApiError::MultipleCertificates => fixed(
                StatusCode::BAD_REQUEST,
                "tls: received more than one client certificate",
            ),
            ApiError::Service(e) => match e {
                S::NotAllowed => fixed(
                    StatusCode::FORBIDDEN,
                    "not authorized: insufficient permissions",
                ),
                S::NoCertificate => fixed(
                    StatusCode::BAD_REQUEST,
                    "tls: client certificate is required",
                ),
                S::AlgorithmUnsupported(c) => unsupported(c),
                S::InvalidKeySize(c) => (
                    StatusCode::NOT_ACCEPTABLE,
                    format!("invalid key size for '{c}'"),
                ),
                S::PolicyNotFound => fixed(StatusCode::NOT_FOUND, "policy does not exist"),
                S::IdentityNotFound => fixed(StatusCode::NOT_FOUND, "identity does not exist"),
                S::Keystore { op, source } => keystore_failure(*op, source),
            },
        }
    }
}

/// KES's words for a name that does not validate, the same for keys, policies and identities.
fn invalid_name(what: &str, name: &str) -> (StatusCode, String) {
    (
        StatusCode::BAD_REQUEST,
        format!("{what} '{name}' is empty, too long or contains invalid characters"),
    )
}

fn unsupported(cipher: &str) -> (StatusCode, String) {
    (
        StatusCode::NOT_ACCEPTABLE,
        format!("algorithm '{cipher}' is not supported"),
    )
}

/// A keystore error on the wire: its variant decides, never its backend's words.
fn keystore_failure(op: KeyOp, e: &KeystoreError) -> (StatusCode, String) {
    use KeystoreError as K;
    let (status, msg) = match e {
        K::KeyExists => (StatusCode::BAD_REQUEST, "key already exists"),
        K::KeyNotFound => (StatusCode::NOT_FOUND, "key does not exist"),
        K::NotAuthentic => (
            StatusCode::BAD_REQUEST,
            "decryption failed: ciphertext is not authentic",
        ),
        K::HmacUnsupported => (StatusCode::CONFLICT, "key does not support HMAC"),
        K::AlgorithmUnsupported(c) => return unsupported(c),
        K::InvalidInput(_) if op == KeyOp::Import => {
            (StatusCode::BAD_REQUEST, "invalid import key request body")
        }
        K::InvalidInput(_) => (StatusCode::BAD_REQUEST, "invalid request body"),
        // The only 503: kms-go retries it, which is what a full session pool wants.
        K::Busy(_) => (StatusCode::SERVICE_UNAVAILABLE, "key store is busy"),
        K::Unreachable(_) => (StatusCode::GATEWAY_TIMEOUT, "key store is not reachable"),
        K::Backend(_) => backend_failure(op),
        // kesh's extensions (key versions): no KES message to match.
        K::VersionNotFound => (StatusCode::NOT_FOUND, "key version does not exist"),
        K::VersionRefused(why) => (StatusCode::CONFLICT, *why),
        K::Unsupported(what) => {
            return (
                StatusCode::NOT_IMPLEMENTED,
                format!("{what} is not supported by this keystore"),
            )
        }
    };
    (status, msg.to_owned())
}

/// A JSON error response: exact body, `Content-Type: application/json`, exact length.
pub fn error_response(status: StatusCode, message: &str) -> Response {
    let body = api::encode_error(message);
    let mut resp = Response::new(Body::from(body));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    resp
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, message) = self.status_and_message();
        let mut resp = error_response(status, &message);
        match &self {
            ApiError::MethodNotAllowed { want, .. } => {
                // The reference sets `Accept` (sic); `Allow` is the standard header.
                if let Ok(v) = HeaderValue::from_str(want.as_str()) {
                    resp.headers_mut().insert(header::ACCEPT, v.clone());
                    resp.headers_mut().insert(header::ALLOW, v);
                }
            }
            ApiError::Service(e) if matches!(e.keystore(), Some(KeystoreError::Busy(_))) => {
                resp.headers_mut()
                    .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
            }
            _ => {}
        }
        resp
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    #[tokio::test]
    async fn exact_error_body() {
        let keystore = |source| {
            ApiError::Service(ServiceError::Keystore {
                op: KeyOp::Create,
                source,
            })
        };
        let resp = keystore(KeystoreError::KeyExists).into_response();
        assert_eq!(resp.status(), 400);
        assert_eq!(resp.headers()[header::CONTENT_TYPE], "application/json");
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(&body[..], b"{\"message\":\"key already exists\"\n}");
        let resp = keystore(KeystoreError::Busy(std::time::Duration::ZERO)).into_response();
        assert_eq!(resp.status(), 503);
        assert_eq!(resp.headers()[header::RETRY_AFTER], "1");
    }
}
