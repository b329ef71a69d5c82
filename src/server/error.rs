//! The one error → HTTP mapping (`kes-api.md` §2, §9.1).
//!
//! Every failure a handler can meet becomes an [`ApiError`]; its [`IntoResponse`] holds the
//! whole status/message table. Bodies are byte-exact `{"message":"..."\n}` with
//! `Content-Type: application/json`. No code anywhere branches on message text.

use axum::body::Body;
use axum::response::{IntoResponse, Response};
use http::{header, HeaderValue, Method, StatusCode};

use crate::api;
use crate::server::service::{Op, ServiceError};

/// Which request body could not be decoded; import words it differently.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyKind {
    Import,
    Other,
}

/// A failed request, before it becomes a response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ApiError {
    /// Wrong method for the route (`POST` on `PUT` routes is not wrong).
    MethodNotAllowed {
        got: Method,
        want: Method,
    },
    InvalidKeyName(String),
    InvalidPattern(String),
    InvalidPolicyName(String),
    InvalidIdentity(String),
    InvalidBody(BodyKind),
    /// kesh's `/v1/key/destroy-version/<name>/<version>` without a valid `<version>`.
    InvalidKeyVersion(String),
    /// The client sent more than one end-entity certificate.
    MultipleCertificates,
    Service(ServiceError),
}

impl From<ServiceError> for ApiError {
    fn from(e: ServiceError) -> Self {
        ApiError::Service(e)
    }
}

/// The message of a keystore failure, by operation (§2.6–2.14, §2.2).
fn backend_failure(op: Op) -> (StatusCode, &'static str) {
    match op {
        Op::Create | Op::Import => (StatusCode::BAD_GATEWAY, "failed to create key"),
        Op::Describe | Op::Hmac => (StatusCode::BAD_GATEWAY, "failed to read key"),
        Op::List => (StatusCode::BAD_GATEWAY, "failed to list keys"),
        Op::Delete => (StatusCode::BAD_GATEWAY, "failed to delete key"),
        Op::Generate => (
            StatusCode::INTERNAL_SERVER_ERROR,
            "failed to generate encryption key",
        ),
        Op::Encrypt => (
            StatusCode::INTERNAL_SERVER_ERROR,
            "failed to encrypt plaintext",
        ),
        Op::Decrypt => (
            StatusCode::INTERNAL_SERVER_ERROR,
            "failed to decrypt ciphertext",
        ),
        Op::Ready => (StatusCode::BAD_GATEWAY, "key store is unavailable"),
        Op::Rotate => (StatusCode::BAD_GATEWAY, "failed to rotate key"),
        Op::Versions => (StatusCode::BAD_GATEWAY, "failed to read key"),
        Op::DestroyVersion => (StatusCode::BAD_GATEWAY, "failed to delete key version"),
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
            ApiError::InvalidKeyName(n) => (
                StatusCode::BAD_REQUEST,
                format!("key name '{n}' is empty, too long or contains invalid characters"),
            ),
            ApiError::InvalidPattern(p) => (
                StatusCode::BAD_REQUEST,
                format!("listing pattern '{p}' is empty, too long or is invalid"),
            ),
            ApiError::InvalidPolicyName(n) => (
                StatusCode::BAD_REQUEST,
                format!("policy name '{n}' is empty, too long or contains invalid characters"),
            ),
            ApiError::InvalidIdentity(i) => (
                StatusCode::BAD_REQUEST,
                format!("identity '{i}' is empty, too long or contains invalid characters"),
            ),
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
                S::KeyExists => fixed(StatusCode::BAD_REQUEST, "key already exists"),
                S::KeyNotFound => fixed(StatusCode::NOT_FOUND, "key does not exist"),
                S::NotAuthentic => fixed(
                    StatusCode::BAD_REQUEST,
                    "decryption failed: ciphertext is not authentic",
                ),
                S::HmacUnsupported => fixed(StatusCode::CONFLICT, "key does not support HMAC"),
                S::AlgorithmUnsupported(c) => (
                    StatusCode::NOT_ACCEPTABLE,
                    format!("algorithm '{c}' is not supported"),
                ),
                S::InvalidKeySize(c) => (
                    StatusCode::NOT_ACCEPTABLE,
                    format!("invalid key size for '{c}'"),
                ),
                S::PolicyNotFound => fixed(StatusCode::NOT_FOUND, "policy does not exist"),
                S::IdentityNotFound => fixed(StatusCode::NOT_FOUND, "identity does not exist"),
                S::InvalidInput(Op::Import, _) => {
                    fixed(StatusCode::BAD_REQUEST, "invalid import key request body")
                }
                S::InvalidInput(_, _) => fixed(StatusCode::BAD_REQUEST, "invalid request body"),
                // The only 503: kms-go retries it, which is what a full session pool wants.
                S::Busy => fixed(StatusCode::SERVICE_UNAVAILABLE, "key store is busy"),
                S::Unreachable(_, _) => {
                    fixed(StatusCode::GATEWAY_TIMEOUT, "key store is not reachable")
                }
                S::Backend(op, _) => {
                    let (status, msg) = backend_failure(*op);
                    fixed(status, msg)
                }
                // kesh's extensions (key versions): no KES message to match.
                S::VersionNotFound => fixed(StatusCode::NOT_FOUND, "key version does not exist"),
                S::VersionRefused(why) => fixed(StatusCode::CONFLICT, why),
                S::Unsupported(what) => (
                    StatusCode::NOT_IMPLEMENTED,
                    format!("{what} is not supported by this keystore"),
                ),
            },
        }
    }
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
            ApiError::Service(ServiceError::Busy) => {
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
        let resp = ApiError::Service(ServiceError::KeyExists).into_response();
        assert_eq!(resp.status(), 400);
        assert_eq!(resp.headers()[header::CONTENT_TYPE], "application/json");
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(&body[..], b"{\"message\":\"key already exists\"\n}");
        let resp = ApiError::Service(ServiceError::Busy).into_response();
        assert_eq!(resp.status(), 503);
        assert_eq!(resp.headers()[header::RETRY_AFTER], "1");
    }
}
