//! Request-and-assert helpers for the KES API: one request, and the exact response shapes KES
//! answers with (an error's status and message, an empty 200, a JSON body).

use bytes::Bytes;
use http::{Method, StatusCode};
use kesh::client::{Client, ClientError, RawResponse};

pub async fn send(c: &Client, method: Method, path: &str, body: Option<&[u8]>) -> RawResponse {
    c.send(method, path, body.map(Bytes::copy_from_slice), None)
        .await
        .unwrap()
}

/// Asserts the exact KES error response: status, content type and body byte for byte.
pub fn assert_error(r: &RawResponse, status: u16, message: &str) {
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

/// Asserts a 200 with no body and no content type.
pub fn assert_empty_ok(r: &RawResponse) {
    assert_eq!(
        r.status,
        StatusCode::OK,
        "body: {:?}",
        String::from_utf8_lossy(&r.body)
    );
    assert!(r.body.is_empty());
    assert!(r.headers.get("content-type").is_none());
}

/// Asserts a 200 with a JSON body ending in a newline, as KES writes it; the decoded body.
pub fn json<T: serde::de::DeserializeOwned>(r: &RawResponse) -> T {
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

/// The (status, message) of a client call the server answered with an error.
pub fn status_of(e: impl std::borrow::Borrow<ClientError>) -> (u16, String) {
    let e = e.borrow();
    let api = e.api().unwrap_or_else(|| panic!("not an API error: {e}"));
    (api.status, api.message.to_string())
}

/// Sends one request and asserts the exact KES error it answers; a failure names the request.
pub async fn assert_request_error(
    c: &Client,
    method: Method,
    path: &str,
    body: Option<&[u8]>,
    status: u16,
    message: &str,
) {
    let r = send(c, method.clone(), path, body).await;
    assert_eq!(
        r.status.as_u16(),
        status,
        "{method} {path}: {:?}",
        String::from_utf8_lossy(&r.body)
    );
    assert_error(&r, status, message);
}

/// Sends one request and asserts KES's 403: the policy does not allow it.
pub async fn assert_not_allowed(c: &Client, method: Method, path: &str) {
    assert_request_error(
        c,
        method,
        path,
        None,
        403,
        "not authorized: insufficient permissions",
    )
    .await;
}

/// The next line of a log stream (`/v1/log/audit`, `/v1/log/error`), within 5 s.
pub async fn next_line(stream: &mut kesh::client::LineStream) -> Bytes {
    tokio::time::timeout(std::time::Duration::from_secs(5), stream.next_line())
        .await
        .expect("a line within 5 s")
        .unwrap()
        .expect("the stream is open")
}
