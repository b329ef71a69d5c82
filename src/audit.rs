//! The audit trail and the error-event stream (`kes-api.md` §2.21, §2.22).
//!
//! [`AuditLog`] takes one [`AuditEvent`] per key operation — time, client IP, identity, path,
//! status, duration; never key material, plaintexts or request bodies — writes it to the
//! `kesh::audit` tracing target and fans it out as an ndjson line to every `/v1/log/audit`
//! subscriber. [`ErrorLog`] does the same for server errors and `/v1/log/error`.
//! Slow subscribers lose the oldest lines rather than slowing requests down.

use std::sync::Arc;

use bytes::Bytes;
use time::OffsetDateTime;
use tokio::sync::broadcast;

use crate::api::{self, AuditEvent, ErrorEvent};
use crate::metrics::Metrics;

/// Lines buffered per subscriber before the oldest are dropped.
const STREAM_BUFFER: usize = 1024;

/// Fan-out of ndjson lines to live subscribers.
#[derive(Debug, Clone)]
struct Stream {
    tx: broadcast::Sender<Bytes>,
}

impl Stream {
    fn new() -> Self {
        Stream {
            tx: broadcast::channel(STREAM_BUFFER).0,
        }
    }

    /// Sends to every subscriber; returns how many received it.
    fn publish(&self, line: Bytes) -> usize {
        self.tx.send(line).unwrap_or(0)
    }
}

/// A live subscription: yields whole ndjson lines.
#[derive(Debug)]
pub struct Subscription {
    rx: broadcast::Receiver<Bytes>,
}

impl Subscription {
    /// The next line, skipping ones lost to lag; `None` once the log is gone.
    pub async fn next(&mut self) -> Option<Bytes> {
        loop {
            match self.rx.recv().await {
                Ok(line) => return Some(line),
                Err(broadcast::error::RecvError::Lagged(n)) => {
                    tracing::warn!(lost = n, "log stream subscriber too slow; events dropped");
                }
                Err(broadcast::error::RecvError::Closed) => return None,
            }
        }
    }
}

/// The audit trail.
#[derive(Debug, Clone)]
pub struct AuditLog {
    stream: Stream,
    metrics: Arc<Metrics>,
    /// Whether audit records also go to the `kesh::audit` tracing target (`log.audit`).
    to_tracing: bool,
}

impl AuditLog {
    pub fn new(metrics: Arc<Metrics>, to_tracing: bool) -> Self {
        AuditLog {
            stream: Stream::new(),
            metrics,
            to_tracing,
        }
    }

    /// Records one finished request.
    pub fn record(
        &self,
        ip: &str,
        identity: &str,
        path: &str,
        code: u16,
        elapsed: std::time::Duration,
    ) {
        let event = AuditEvent {
            time: OffsetDateTime::now_utc(),
            request: api::AuditRequest {
                ip: ip.to_owned(),
                path: path.to_owned(),
                identity: identity.to_owned(),
            },
            response: api::AuditResponse {
                code,
                time: u64::try_from(elapsed.as_millis()).unwrap_or(u64::MAX),
            },
        };
        if self.to_tracing {
            tracing::info!(
                target: "kesh::audit",
                path,
                ip,
                identity,
                code,
                time_ms = event.response.time,
                "audit"
            );
        }
        let sent = self
            .stream
            .publish(Bytes::from(api::encode_response(&event)));
        for _ in 0..sent {
            self.metrics.audit_event_sent();
        }
    }

    pub fn subscribe(&self) -> Subscription {
        Subscription {
            rx: self.stream.tx.subscribe(),
        }
    }
}

/// Server error events for `/v1/log/error`.
#[derive(Debug, Clone)]
pub struct ErrorLog {
    stream: Stream,
    metrics: Arc<Metrics>,
    enabled: bool,
}

impl ErrorLog {
    pub fn new(metrics: Arc<Metrics>, enabled: bool) -> Self {
        ErrorLog {
            stream: Stream::new(),
            metrics,
            enabled,
        }
    }

    /// Records a failed request: logged at ERROR to stderr and streamed as one slog-style text
    /// line, like the reference's `{"message":"time=... level=ERROR msg=..."}`.
    pub fn record(&self, msg: &str, method: &str, path: &str, ip: &str, identity: &str) {
        if !self.enabled {
            return;
        }
        tracing::error!(req.method = method, path, ip, identity, "{msg}");
        let time = api::rfc3339::format(&OffsetDateTime::now_utc());
        let line = format!(
            "time={time} level=ERROR msg={} req.method={method} req.path={path} req.ip={ip} req.identity={identity}",
            quote(msg)
        );
        let sent = self
            .stream
            .publish(Bytes::from(api::encode_response(&ErrorEvent {
                message: line,
            })));
        for _ in 0..sent {
            self.metrics.error_event_sent();
        }
    }

    pub fn subscribe(&self) -> Subscription {
        Subscription {
            rx: self.stream.tx.subscribe(),
        }
    }
}

/// slog's text quoting: bare when safe, else a quoted string.
fn quote(s: &str) -> String {
    if !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_graphic() && c != '"' && c != '=')
    {
        s.to_owned()
    } else {
        format!("{s:?}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn subscribers_receive_events() {
        let metrics = Arc::new(Metrics::new());
        let audit = AuditLog::new(metrics.clone(), false);
        let mut sub = audit.subscribe();
        audit.record(
            "127.0.0.1",
            "abc",
            "/v1/key/create/k",
            200,
            std::time::Duration::from_millis(3),
        );
        let line = sub.next().await.unwrap();
        let event: AuditEvent = serde_json::from_slice(&line).unwrap();
        assert_eq!(event.request.path, "/v1/key/create/k");
        assert_eq!(event.response.code, 200);
        assert_eq!(event.response.time, 3);
        assert!(line.ends_with(b"\n"));
        assert!(metrics.render(None).contains("kes_log_audit_events 1\n"));

        let errors = ErrorLog::new(metrics, true);
        let mut sub = errors.subscribe();
        errors.record("failed to read key", "PUT", "/v1/key/generate/k", "::1", "");
        let event: ErrorEvent = serde_json::from_slice(&sub.next().await.unwrap()).unwrap();
        assert!(
            event
                .message
                .contains("level=ERROR msg=\"failed to read key\" req.method=PUT"),
            "{}",
            event.message
        );
    }
}
