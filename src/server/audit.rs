//! The audit trail and the error-event stream (docs/api.md, "Logs"; KES: `audit.go`, `log.go` and
//! `internal/api/multicast.go` at github.com/minio/kes).
//!
//! [`AuditLog`] takes one [`AuditEvent`] per key operation — time, client IP, identity, path,
//! status, duration; never key material, plaintexts or request bodies — writes it to stdout as
//! a slog-style text line, as KES does (through [`crate::server::logsink`], so a request never waits for
//! a write), and fans it out as an ndjson line to every `/v1/log/audit` subscriber.
//! [`ErrorLog`] does the same for server errors (to stderr, through `tracing`) and
//! `/v1/log/error`.
//! Slow subscribers lose the oldest lines rather than slowing requests down.

use std::sync::Arc;

use bytes::Bytes;
use time::OffsetDateTime;
use tokio::sync::broadcast;

use crate::api::{self, AuditEvent, ErrorEvent};
use crate::server::logsink::LineSink;
use crate::server::metrics::Metrics;

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

    /// Sends the line `encode` makes to every subscriber; returns how many received it.
    /// Nothing is encoded while nobody listens.
    fn publish(&self, encode: impl FnOnce() -> Vec<u8>) -> usize {
        if self.tx.receiver_count() == 0 {
            return 0;
        }
        self.tx.send(Bytes::from(encode())).unwrap_or(0)
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
    /// Where audit lines are written (stdout unless `log.audit` is off).
    lines: Option<LineSink>,
}

impl AuditLog {
    /// An audit log writing to stdout when `to_stdout` (`log.audit`), else only streaming.
    pub fn new(metrics: Arc<Metrics>, to_stdout: bool) -> Self {
        Self::with_sink(metrics, to_stdout.then(LineSink::stdout))
    }

    /// An audit log writing its lines to `lines`.
    pub fn with_sink(metrics: Arc<Metrics>, lines: Option<LineSink>) -> Self {
        AuditLog {
            stream: Stream::new(),
            metrics,
            lines,
        }
    }

    /// Writes out the lines not yet written (at shutdown).
    pub fn flush(&self) {
        if let Some(lines) = &self.lines {
            lines.flush();
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
        if let Some(lines) = &self.lines {
            lines.line(|out| text_line(out, &event));
        }
        let sent = self.stream.publish(|| api::encode_response(&event));
        for _ in 0..sent {
            self.metrics.audit_event_sent();
        }
    }

    /// A new `/v1/log/...` stream: events from now on, one JSON line each.
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
    /// An error log; `enabled` is the config's `log: error:` switch.
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
            Quoted(msg)
        );
        let sent = self
            .stream
            .publish(|| api::encode_response(&ErrorEvent { message: line }));
        for _ in 0..sent {
            self.metrics.error_event_sent();
        }
    }

    /// A new `/v1/log/...` stream: events from now on, one JSON line each.
    pub fn subscribe(&self) -> Subscription {
        Subscription {
            rx: self.stream.tx.subscribe(),
        }
    }
}

/// The slog text line KES writes for an audit record, with KES's messages for the events it
/// audits itself (a successful create, import or delete).
fn text_line(out: &mut Vec<u8>, event: &AuditEvent) {
    use std::io::Write;
    let req = &event.request;
    let done = |prefix: &str| {
        (event.response.code == 200)
            .then(|| req.path.strip_prefix(prefix))
            .flatten()
    };
    // Writing into a Vec cannot fail. A 200 names a valid key, which needs no escaping.
    let _ = write!(
        out,
        "time={} level=INFO msg=",
        api::rfc3339::format(&event.time)
    );
    let _ = if let Some(name) = done("/v1/key/create/").or(done("/v1/key/import/")) {
        write!(out, "\"secret key '{name}' created\"")
    } else if let Some(name) = done("/v1/key/delete/") {
        write!(out, "\"secret key '{name}' deleted\"")
    } else {
        out.write_all(b"audit")
    };
    let _ = write!(
        out,
        " req.path={} req.ip={} req.identity={} res.code={} res.time={}ms",
        Quoted(&req.path),
        Quoted(&req.ip),
        Quoted(&req.identity),
        event.response.code,
        event.response.time,
    );
}

/// slog's text quoting: bare when safe, else a quoted string.
struct Quoted<'a>(&'a str);

impl std::fmt::Display for Quoted<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = self.0;
        if !s.is_empty()
            && s.chars()
                .all(|c| c.is_ascii_graphic() && c != '"' && c != '=')
        {
            f.write_str(s)
        } else {
            write!(f, "{s:?}")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_lines_read_like_kes() {
        let event = |path: &str, code| AuditEvent {
            time: time::macros::datetime!(2026-12-01 09:00:00.5 UTC),
            request: api::AuditRequest {
                ip: "10.0.0.1".into(),
                path: path.into(),
                identity: "ab12".into(),
            },
            response: api::AuditResponse { code, time: 3 },
        };
        let line = |e: &AuditEvent| {
            let mut out = Vec::new();
            text_line(&mut out, e);
            String::from_utf8(out).unwrap()
        };
        let created = line(&event("/v1/key/create/minio", 200));
        assert!(
            created.starts_with("time=2026-12-01T09:00:00.5"),
            "{created}"
        );
        assert!(
            created.ends_with(
                "level=INFO msg=\"secret key 'minio' created\" req.path=/v1/key/create/minio \
                 req.ip=10.0.0.1 req.identity=ab12 res.code=200 res.time=3ms"
            ),
            "{created}"
        );
        assert!(line(&event("/v1/key/delete/minio", 200))
            .contains("msg=\"secret key 'minio' deleted\""));
        let denied = line(&event("/v1/key/create/a b", 403));
        assert!(
            denied.contains("msg=audit req.path=\"/v1/key/create/a b\"")
                && denied.contains("res.code=403"),
            "{denied}"
        );
    }

    #[tokio::test]
    async fn subscribers_receive_events() {
        let metrics = Arc::new(Metrics::new());
        let audit = AuditLog::new(metrics.clone(), false);
        // Nobody listens yet: nothing is sent or counted.
        audit.record("::1", "", "/v1/key/create/k", 200, Default::default());
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
        assert!(metrics.render_kes().contains("kes_log_audit_events 1\n"));

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
