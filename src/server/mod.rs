//! The HTTPS server: TLS accept, client identity, dispatch, limits, audit and shutdown.
//!
//! Each TCP connection is handshaken with the TLS config in force at that moment (hot-swapped
//! on SIGHUP; open connections keep theirs). The client's identity is computed once per
//! connection from the certificate that signed the handshake. Every request then goes through
//! `dispatch`: path decoding, route match, method check, deadline, authentication, body limit,
//! handler; the outcome is counted, audited and, for 5xx, sent to the error log.

pub mod audit;
pub mod error;
#[allow(
    unsafe_code,
    reason = "FFI: setrlimit, prctl and mlockall, which std does not offer"
)]
pub mod hardening;
pub mod logsink;
pub mod metrics;
pub mod policy;
pub mod rotation;
pub mod routes;
pub mod service;
pub mod tls;

use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use http::{header, HeaderValue, Method, StatusCode};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use time::OffsetDateTime;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_rustls::TlsAcceptor;

use self::error::{ApiError, BodyKind};
use self::routes::{Auth, Route, RouteId, RouteSettings};
use crate::config::server::ServerConfig;
use crate::identity::{identify_peer, Identity, PeerError};
use crate::locks::IgnorePoison;
use crate::name::KeyName;
use crate::server::audit::{AuditLog, ErrorLog};
use crate::server::policy::{Authorizer, Permit};
use crate::server::service::Service;

/// How long a TLS handshake may take.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// `ReadHeaderTimeout` of the reference.
const HEADER_TIMEOUT: Duration = Duration::from_secs(5);
/// Open connections at most; past it new ones are closed at once, so descriptors and memory
/// stay bounded whatever clients do. Idle HTTP/1.1 connections are closed after
/// `HEADER_TIMEOUT`, so idle clients cannot hold the slots.
pub const DEFAULT_MAX_CONNECTIONS: usize = 4096;
/// HTTP/2 pings an idle peer this often and drops it when the ping goes unanswered.
const H2_KEEPALIVE: Duration = Duration::from_secs(30);
/// How long shutdown waits for requests in flight.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// Shared by every connection.
pub struct State {
    pub(crate) service: Arc<Service>,
    pub(crate) audit: AuditLog,
    pub(crate) errors: ErrorLog,
    /// Per-route `api:` settings; replaced on reload.
    routes: RwLock<Arc<RouteSettings>>,
    tls: RwLock<TlsAcceptor>,
}

impl State {
    pub(crate) fn routes(&self) -> Arc<RouteSettings> {
        self.routes.read().ignore_poison().clone()
    }
}

/// What a connection knows about its peer.
#[derive(Debug, Clone)]
struct ConnInfo {
    ip: IpAddr,
    identity: Result<Identity, PeerError>,
}

/// Everything a server needs to run.
pub struct ServerParts {
    /// The API operations over the keystore.
    pub service: Arc<Service>,
    /// The TLS settings for the first connections (replaced on reload).
    pub tls: Arc<rustls::ServerConfig>,
    /// The config's per-route `api:` settings.
    pub routes: RouteSettings,
    /// Where audit events go.
    pub audit: AuditLog,
    /// Where error events go.
    pub errors: ErrorLog,
}

/// The TLS config a config file describes (server cert and key, client authentication).
pub fn tls_from_config(
    cfg: &ServerConfig,
) -> Result<Arc<rustls::ServerConfig>, crate::tls::TlsError> {
    tls_for_routes(cfg, &RouteSettings::new(&cfg.api))
}

/// The TLS config for `cfg` with the `api:` settings `routes`: a client certificate is
/// mandatory in the handshake unless some route skips authentication.
fn tls_for_routes(
    cfg: &ServerConfig,
    routes: &RouteSettings,
) -> Result<Arc<rustls::ServerConfig>, crate::tls::TlsError> {
    let certs = crate::tls::load_certs(&cfg.tls.cert)?;
    // As KES: clients check the server's name, so a leaf without one can never be reached.
    // `load_certs` never returns an empty list, so `certs[0]` is the leaf.
    if !crate::identity::has_dns_or_ip_san(&certs[0]).unwrap_or(false) {
        return Err(crate::tls::TlsError::NoSubjectAltName(cfg.tls.cert.clone()));
    }
    let key = crate::tls::load_key(&cfg.tls.key)?;
    let auth = match (&cfg.tls.ca, cfg.tls.verify_client_chain) {
        (Some(ca), true) => tls::ClientAuth::VerifyChain(Arc::new(crate::tls::load_roots(ca)?)),
        _ => tls::ClientAuth::AnyCertificate,
    };
    tls::server_config(certs, key, &auth, !routes.any_skip_auth())
}

/// Creates the config's `keys:` (KES does so at start and on reload); existing keys are fine.
pub async fn create_keys(
    service: &Service,
    keys: &[KeyName],
) -> Result<(), crate::server::service::ServiceError> {
    let permit = service.identify_only(None);
    for name in keys {
        match service.create_key(&permit, name).await {
            Ok(()) => tracing::info!(key = %name, "created key listed in config"),
            Err(e) if e.keystore() == Some(&crate::keystore::KeystoreError::KeyExists) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// A bound, not yet running server.
pub struct Server {
    state: Arc<State>,
    listener: TcpListener,
    connections: Arc<tokio::sync::Semaphore>,
    shutdown: watch::Receiver<bool>,
    handle: ServerHandle,
}

/// Controls a running server: reloads and shutdown. Cheap to clone.
#[derive(Clone)]
pub struct ServerHandle {
    state: Arc<State>,
    shutdown: Arc<watch::Sender<bool>>,
}

impl ServerHandle {
    /// New TLS settings for connections accepted from now on.
    pub fn set_tls(&self, config: Arc<rustls::ServerConfig>) {
        *self.state.tls.write().ignore_poison() = TlsAcceptor::from(config);
    }

    /// A new admin and policy set for requests from now on.
    pub fn set_authorizer(&self, authorizer: Authorizer) {
        self.state.service.replace_authorizer(authorizer);
    }

    /// The server's service.
    pub fn service(&self) -> &Arc<Service> {
        &self.state.service
    }

    /// Applies a re-read config file (SIGHUP), as KES does: TLS for new connections; admin,
    /// policies and `api:` route settings for new requests; the listed keys created.
    /// Connections stay open. Everything is checked, and the keys created, before anything
    /// is swapped: on an error the running configuration stays whole.
    pub async fn reload(&self, cfg: &ServerConfig) -> Result<(), String> {
        let authorizer = cfg
            .authorizer(OffsetDateTime::now_utc())
            .map_err(|e| e.to_string())?;
        let routes = RouteSettings::new(&cfg.api);
        let tls = tls_for_routes(cfg, &routes).map_err(|e| e.to_string())?;
        // Before the keys: a keystore waiting after a refused PIN logs in once here.
        if let Some(pin) = cfg.keystore.pin() {
            if let Err(e) = self.state.service.reload_pin(pin.clone()).await {
                tracing::error!(error = %e, "reload: the keystore is still not in service");
            }
        }
        create_keys(&self.state.service, &cfg.keys)
            .await
            .map_err(|e| format!("creating the listed keys: {e}"))?;
        self.state
            .service
            .set_rotation_schedule(cfg.rotate_after.clone());
        self.set_tls(tls);
        self.set_authorizer(authorizer);
        *self.state.routes.write().ignore_poison() = Arc::new(routes);
        Ok(())
    }

    /// Stops accepting and lets requests in flight finish (bounded by a grace period).
    pub fn shutdown(&self) {
        self.shutdown.send_replace(true);
    }
}

impl Server {
    /// Listens on `addr` (port 0: any free port); serving starts with [`Server::run`].
    pub async fn bind(addr: SocketAddr, parts: ServerParts) -> std::io::Result<Server> {
        let listener = TcpListener::bind(addr).await?;
        rotation::spawn(&parts.service);
        let state = Arc::new(State {
            service: parts.service,
            audit: parts.audit,
            errors: parts.errors,
            routes: RwLock::new(Arc::new(parts.routes)),
            tls: RwLock::new(TlsAcceptor::from(parts.tls)),
        });
        let (tx, rx) = watch::channel(false);
        let handle = ServerHandle {
            state: state.clone(),
            shutdown: Arc::new(tx),
        };
        Ok(Server {
            state,
            listener,
            connections: Arc::new(tokio::sync::Semaphore::new(DEFAULT_MAX_CONNECTIONS)),
            shutdown: rx,
            handle,
        })
    }

    /// Caps open connections (default [`DEFAULT_MAX_CONNECTIONS`]).
    pub fn with_max_connections(mut self, max: usize) -> Self {
        self.connections = Arc::new(tokio::sync::Semaphore::new(max.max(1)));
        self
    }

    /// The address it listens on.
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// A handle to reload or stop it while it runs.
    pub fn handle(&self) -> ServerHandle {
        self.handle.clone()
    }

    /// Serves until [`ServerHandle::shutdown`]; then waits for open requests up to the grace
    /// period.
    pub async fn run(mut self) -> std::io::Result<()> {
        let graceful = hyper_util::server::graceful::GracefulShutdown::new();
        loop {
            tokio::select! {
                accepted = self.listener.accept() => {
                    let (tcp, peer) = match accepted {
                        Ok(a) => a,
                        Err(e) => {
                            // Out of file descriptors and the like: back off, keep serving.
                            tracing::warn!(error = %e, "accept failed");
                            tokio::time::sleep(Duration::from_millis(50)).await;
                            continue;
                        }
                    };
                    let Ok(slot) = self.connections.clone().try_acquire_owned() else {
                        tracing::warn!(peer = %peer, "connection limit reached; closing the new connection");
                        drop(tcp);
                        continue;
                    };
                    let _ = tcp.set_nodelay(true);
                    let acceptor = self.state.tls.read().ignore_poison().clone();
                    let state = self.state.clone();
                    let watcher = graceful.watcher();
                    tokio::spawn(async move {
                        let _slot = slot;
                        let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                            Ok(Ok(tls)) => tls,
                            Ok(Err(e)) => {
                                tracing::debug!(peer = %peer, error = %e, "TLS handshake failed");
                                return;
                            }
                            Err(_) => {
                                tracing::debug!(peer = %peer, "TLS handshake timed out");
                                return;
                            }
                        };
                        let identity = match tls.get_ref().1.peer_certificates() {
                            Some(chain) => identify_peer(chain),
                            None => Err(PeerError::NoCertificate),
                        };
                        let conn = Arc::new(ConnInfo { ip: peer.ip(), identity });
                        let svc = hyper::service::service_fn(move |req| {
                            let state = state.clone();
                            let conn = conn.clone();
                            async move {
                                // A HEAD response carries headers only (RFC 9110 §9.3.2); a
                                // body would break the connection for HTTP/1.1 and h2 clients.
                                let head = req.method() == Method::HEAD;
                                // A bug that panics in a handler costs that request a 500,
                                // never the connection or the process.
                                let served = std::panic::AssertUnwindSafe(dispatch(&state, &conn, req));
                                let resp = match futures_util::FutureExt::catch_unwind(served).await {
                                    Ok(resp) => resp?,
                                    Err(_) => {
                                        tracing::error!(peer = %conn.ip, "request handler panicked");
                                        error::error_response(StatusCode::INTERNAL_SERVER_ERROR, "internal server error")
                                    }
                                };
                                Ok::<_, DeadlineExceeded>(if head { strip_body(resp) } else { resp })
                            }
                        });
                        let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
                        builder.http1().timer(TokioTimer::new()).header_read_timeout(HEADER_TIMEOUT);
                        builder
                            .http2()
                            .timer(TokioTimer::new())
                            .keep_alive_interval(H2_KEEPALIVE)
                            .keep_alive_timeout(HANDSHAKE_TIMEOUT);
                        let conn = builder.serve_connection(TokioIo::new(tls), svc);
                        if let Err(e) = watcher.watch(conn).await {
                            tracing::debug!(peer = %peer, error = %e, "connection ended with an error");
                        }
                    });
                }
                _ = self.shutdown.changed() => break,
            }
        }
        drop(self.listener);
        if tokio::time::timeout(SHUTDOWN_GRACE, graceful.shutdown())
            .await
            .is_err()
        {
            tracing::warn!("shutdown grace period over; closing remaining connections");
        }
        self.state.audit.flush();
        Ok(())
    }
}

/// A request that ran past its route's deadline. Returning it makes hyper abort the
/// connection (HTTP/1.1) or reset the stream (HTTP/2) without a status, as KES does.
#[derive(Debug, thiserror::Error)]
#[error("request deadline exceeded")]
struct DeadlineExceeded;

/// Go's `net/http` default 404.
fn not_found() -> Response {
    let mut resp = Response::new(Body::from("404 page not found\n"));
    *resp.status_mut() = StatusCode::NOT_FOUND;
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    h.insert(
        "x-content-type-options",
        HeaderValue::from_static("nosniff"),
    );
    resp
}

fn plain(status: StatusCode, text: &'static str) -> Response {
    let mut resp = Response::new(Body::from(text));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp
}

/// `%XX` decoding of a URL path, like Go's `url.PathUnescape`; `None` if malformed.
fn percent_decode(path: &str) -> Option<String> {
    if !path.contains('%') {
        return Some(path.to_owned());
    }
    let bytes = path.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = bytes.get(i + 1..i + 3)?;
            let hex = std::str::from_utf8(hex).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    Some(String::from_utf8_lossy(&out).into_owned())
}

/// Go's `path.Clean` keeping a trailing slash, as the mux redirects to; `None` if already clean.
fn clean_path(path: &str) -> Option<String> {
    let dirty = path.contains("//")
        || path.contains("/./")
        || path.contains("/../")
        || path.ends_with("/.")
        || path.ends_with("/..");
    if !dirty {
        return None;
    }
    let mut parts: Vec<&str> = Vec::new();
    for seg in path.split('/') {
        match seg {
            "" | "." => {}
            ".." => {
                parts.pop();
            }
            s => parts.push(s),
        }
    }
    let mut clean = format!("/{}", parts.join("/"));
    if path.ends_with('/') && clean != "/" {
        clean.push('/');
    }
    Some(clean)
}

/// Reads the body up to the route's limit. `Ok(None)` means `Content-Length: 0` was sent.
async fn read_body(req: http::Request<Incoming>, limit: usize) -> Result<Option<Bytes>, ()> {
    if limit == 0 {
        return Ok(Some(Bytes::new()));
    }
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok());
    match declared {
        Some(0) => return Ok(None),
        Some(n) if n > limit as u64 => return Err(()),
        _ => {}
    }
    match Limited::new(req.into_body(), limit).collect().await {
        Ok(collected) => Ok(Some(collected.to_bytes())),
        Err(_) => Err(()),
    }
}

fn strip_body(resp: Response) -> Response {
    let (parts, _) = resp.into_parts();
    Response::from_parts(parts, Body::empty())
}

/// Handles one request end to end.
async fn dispatch(
    state: &Arc<State>,
    conn: &ConnInfo,
    req: http::Request<Incoming>,
) -> Result<Response, DeadlineExceeded> {
    let start = Instant::now();
    let Some(path) = percent_decode(req.uri().path()) else {
        return Ok(plain(
            StatusCode::BAD_REQUEST,
            "400 Bad Request: invalid URL escape",
        ));
    };
    if let Some(clean) = clean_path(&path) {
        let mut resp = Response::new(Body::empty());
        *resp.status_mut() = StatusCode::MOVED_PERMANENTLY;
        if let Ok(v) = HeaderValue::from_str(&clean) {
            resp.headers_mut().insert(header::LOCATION, v);
        }
        return Ok(resp);
    }
    let Some((route, resource)) = routes::lookup(&path) else {
        return Ok(not_found());
    };
    let method = req.method().clone();
    let method_ok =
        method == route.method || (route.method == Method::PUT && method == Method::POST);
    if !method_ok {
        return Ok(ApiError::MethodNotAllowed {
            got: method,
            want: route.method.clone(),
        }
        .into_response());
    }
    let resource = resource.to_owned();
    // A subtree root without its slash (`/v1/key/list`) is the path a Go client reaches after
    // the mux's 301, so policies and the audit trail see the canonical `/v1/key/list/`.
    let path = if route.path.strip_suffix('/') == Some(path.as_str()) {
        format!("{path}/")
    } else {
        path
    };
    let work = serve_route(state, conn, route, &path, resource, req, start);
    match state.routes().timeout(route) {
        Some(deadline) => match tokio::time::timeout(deadline, work).await {
            Ok(resp) => Ok(resp),
            Err(_) => {
                // The client gets no status (KES semantics); the trail still records the
                // request, as a 504, so no key operation goes unaudited.
                let identity = conn.identity.as_ref().map(|i| i.as_str()).unwrap_or("");
                let msg = format!("request deadline of {deadline:?} exceeded; request aborted");
                state
                    .errors
                    .record(&msg, method.as_str(), &path, &conn.ip.to_string(), identity);
                if route.counted {
                    let status = StatusCode::GATEWAY_TIMEOUT;
                    state
                        .service
                        .metrics()
                        .request_finished(status.as_u16(), start.elapsed());
                    finish(state, conn, &path, status, start, None);
                }
                Err(DeadlineExceeded)
            }
        },
        None => Ok(work.await),
    }
}

async fn serve_route(
    state: &Arc<State>,
    conn: &ConnInfo,
    route: &'static Route,
    path: &str,
    resource: String,
    req: http::Request<Incoming>,
    start: Instant,
) -> Response {
    if route.id == RouteId::Version {
        return routes::json(&routes::version());
    }
    let method = req.method().clone();
    let svc = &state.service;
    let permit: Permit = match state.routes().auth(route) {
        Auth::Public | Auth::IdentifyOnly => svc.identify_only(conn.identity.as_ref().ok()),
        Auth::Verify => match authenticate(svc, conn, path) {
            Ok(p) => p,
            Err(e) => {
                let resp = e.into_response();
                if route.counted {
                    finish(state, conn, path, resp.status(), start, None);
                }
                return resp;
            }
        },
    };
    let _active = route.counted.then(|| svc.metrics().request_started());
    // KES validates the key name before it reads a body.
    let bad_name = route.max_body > 0 && crate::name::KeyName::new(&resource).is_err();
    let body = if bad_name {
        Err(ApiError::InvalidKeyName(resource.clone()))
    } else {
        read_body(req, route.max_body).await.map_err(|()| {
            ApiError::InvalidBody(if route.id == RouteId::KeyImport {
                BodyKind::Import
            } else {
                BodyKind::Other
            })
        })
    };
    let result = match body {
        Err(e) => Err(e),
        Ok(body) => {
            let request = routes::Request {
                resource,
                empty_body: body.is_none(),
                body: body.unwrap_or_default(),
            };
            routes::handle(state, route, &permit, request).await
        }
    };
    let (resp, failure) = match result {
        Ok(resp) => (resp, None),
        Err(e) => {
            let (status, message) = e.status_and_message();
            let detail = match &e {
                ApiError::Service(s) => s.to_string(),
                _ => message.clone(),
            };
            let failure = status.is_server_error().then_some((message, detail));
            (e.into_response(), failure)
        }
    };
    if let Some((message, detail)) = &failure {
        let identity = conn.identity.as_ref().map(|i| i.as_str()).unwrap_or("");
        tracing::debug!(path, detail = %detail, "request failed");
        state.errors.record(
            &format!("{message}: {detail}"),
            method.as_str(),
            path,
            &conn.ip.to_string(),
            identity,
        );
    }
    if route.counted {
        svc.metrics()
            .request_finished(resp.status().as_u16(), start.elapsed());
        finish(state, conn, path, resp.status(), start, Some(&permit));
    }
    resp
}

/// The `verifyIdentity` authenticator: one end-entity certificate, then admin or policy.
fn authenticate(svc: &Service, conn: &ConnInfo, path: &str) -> Result<Permit, ApiError> {
    match &conn.identity {
        Err(PeerError::MoreThanOne) => Err(ApiError::MultipleCertificates),
        Err(PeerError::NoCertificate) => Ok(svc.authorize(None, path)?),
        Ok(id) => Ok(svc.authorize(Some(id), path)?),
    }
}

/// Writes the audit event of a counted route.
fn finish(
    state: &State,
    conn: &ConnInfo,
    path: &str,
    status: StatusCode,
    start: Instant,
    permit: Option<&Permit>,
) {
    let identity = permit
        .and_then(|p| p.identity())
        .or(conn.identity.as_ref().ok())
        .map(|i| i.as_str())
        .unwrap_or("");
    state.audit.record(
        &conn.ip.to_string(),
        identity,
        path,
        status.as_u16(),
        start.elapsed(),
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_decode_and_clean_like_go() {
        assert_eq!(
            percent_decode("/v1/key/list/%2A").unwrap(),
            "/v1/key/list/*"
        );
        assert!(percent_decode("/v1/key/list/%2").is_none());
        assert!(percent_decode("/v1/key/list/%zz").is_none());
        assert_eq!(clean_path("/v1//key/list/").unwrap(), "/v1/key/list/");
        assert_eq!(clean_path("/v1/key/../status").unwrap(), "/v1/status");
        assert_eq!(clean_path("/v1/key/list/"), None);
    }
}
