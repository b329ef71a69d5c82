//! Prometheus metrics: KES's families and kesh's keystore families, on two pages.
//!
//! `/v1/metrics` carries KES's families only, shaped as MinIO's client (kms-go
//! `kes.Client.Metrics`) decodes them: it refuses a page where any family other than the three
//! `kes_http_request_*` counters has more than one series, so kesh's labelled families
//! (latency per operation, sessions by state, seals per key) cannot appear there.
//! `/v1/metrics/kesh` carries every family, for Prometheus ([`Metrics::render_kes`],
//! [`Metrics::render_all`]).
//!
//! A private registry of atomics and small locked maps, rendered in the text exposition format
//! (`version=0.0.4`). Families appear in name order; counter-vec families appear only after
//! their first observation, as in the reference. No label ever carries secrets; key names (for
//! the seal counter) are not secret in KES.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::locks::IgnorePoison;

/// The text exposition content type the reference negotiates by default.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8; escaping=underscores";

const RESPONSE_BUCKETS: [f64; 10] = [0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 1.5, 3.0, 5.0, 10.0];
const KEYSTORE_BUCKETS: [f64; 12] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0,
];

/// A fixed-bucket histogram.
#[derive(Debug)]
struct Histogram {
    bounds: &'static [f64],
    counts: Vec<AtomicU64>,
    count: AtomicU64,
    /// Sum in nanoseconds (integral so it can be atomic).
    sum_nanos: AtomicU64,
}

impl Histogram {
    fn new(bounds: &'static [f64]) -> Self {
        Histogram {
            bounds,
            counts: bounds.iter().map(|_| AtomicU64::new(0)).collect(),
            count: AtomicU64::new(0),
            sum_nanos: AtomicU64::new(0),
        }
    }

    fn observe(&self, d: Duration) {
        let secs = d.as_secs_f64();
        for (bound, count) in self.bounds.iter().zip(&self.counts) {
            if secs <= *bound {
                count.fetch_add(1, Ordering::Relaxed);
            }
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sum_nanos.fetch_add(
            u64::try_from(d.as_nanos()).unwrap_or(u64::MAX),
            Ordering::Relaxed,
        );
    }

    fn render(&self, out: &mut String, name: &str, labels: &str) {
        let sep = if labels.is_empty() { "" } else { "," };
        for (bound, count) in self.bounds.iter().zip(&self.counts) {
            let _ = writeln!(
                out,
                "{name}_bucket{{{labels}{sep}le=\"{bound}\"}} {}",
                count.load(Ordering::Relaxed)
            );
        }
        let n = self.count.load(Ordering::Relaxed);
        let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"+Inf\"}} {n}");
        let sum = self.sum_nanos.load(Ordering::Relaxed) as f64 / 1e9;
        let braces = if labels.is_empty() {
            String::new()
        } else {
            format!("{{{labels}}}")
        };
        let _ = writeln!(out, "{name}_sum{braces} {sum}");
        let _ = writeln!(out, "{name}_count{braces} {n}");
    }
}

/// The process-wide registry.
#[derive(Debug)]
pub struct Metrics {
    started: Instant,
    active: AtomicI64,
    success: Mutex<BTreeMap<u16, u64>>,
    error: Mutex<BTreeMap<u16, u64>>,
    failure: Mutex<BTreeMap<u16, u64>>,
    response_time: Histogram,
    audit_events: AtomicU64,
    error_events: AtomicU64,
    keystore_latency: Mutex<BTreeMap<&'static str, Histogram>>,
    keystore_errors: Mutex<BTreeMap<(&'static str, &'static str), u64>>,
    keystore_busy: AtomicU64,
    seals: Mutex<BTreeMap<String, u64>>,
    denials: AtomicU64,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// Decrements the active-requests gauge when the request ends, however it ends.
#[derive(Debug)]
pub struct ActiveGuard<'a>(&'a Metrics);

impl Drop for ActiveGuard<'_> {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Metrics {
    /// Empty metrics; the uptime counts from now.
    pub fn new() -> Self {
        Metrics {
            started: Instant::now(),
            active: AtomicI64::new(0),
            success: Mutex::default(),
            error: Mutex::default(),
            failure: Mutex::default(),
            response_time: Histogram::new(&RESPONSE_BUCKETS),
            audit_events: AtomicU64::new(0),
            error_events: AtomicU64::new(0),
            keystore_latency: Mutex::default(),
            keystore_errors: Mutex::default(),
            keystore_busy: AtomicU64::new(0),
            seals: Mutex::default(),
            denials: AtomicU64::new(0),
        }
    }

    /// Marks a counted request as in flight until the guard drops.
    pub fn request_started(&self) -> ActiveGuard<'_> {
        self.active.fetch_add(1, Ordering::Relaxed);
        ActiveGuard(self)
    }

    /// Records a finished counted request by status class.
    pub fn request_finished(&self, status: u16, elapsed: Duration) {
        let map = match status {
            200..=299 => &self.success,
            400..=499 => &self.error,
            500..=599 => &self.failure,
            _ => return,
        };
        *map.lock().ignore_poison().entry(status).or_default() += 1;
        self.response_time.observe(elapsed);
    }

    /// An event was sent to `/v1/log/audit` subscribers.
    pub fn audit_event_sent(&self) {
        self.audit_events.fetch_add(1, Ordering::Relaxed);
    }

    /// An event was sent to `/v1/log/error` subscribers.
    pub fn error_event_sent(&self) {
        self.error_events.fetch_add(1, Ordering::Relaxed);
    }

    /// One keystore call: its latency by operation and, on failure, its error kind.
    pub fn keystore_call(&self, op: &'static str, elapsed: Duration, error: Option<&'static str>) {
        self.keystore_latency
            .lock()
            .ignore_poison()
            .entry(op)
            .or_insert_with(|| Histogram::new(&KEYSTORE_BUCKETS))
            .observe(elapsed);
        if let Some(kind) = error {
            *self
                .keystore_errors
                .lock()
                .ignore_poison()
                .entry((op, kind))
                .or_default() += 1;
            if kind == "busy" {
                self.keystore_busy.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// A data key or plaintext sealed under `key` (the random-IV GCM bound is per key).
    pub fn sealed(&self, key: &str) {
        *self
            .seals
            .lock()
            .ignore_poison()
            .entry(key.to_owned())
            .or_default() += 1;
    }

    /// A request was refused by the policy check.
    pub fn denied(&self) {
        self.denials.fetch_add(1, Ordering::Relaxed);
    }

    /// KES's families alone: the `/v1/metrics` page MinIO reads.
    pub fn render_kes(&self) -> String {
        let mut out = String::with_capacity(4096);
        self.render_kes_into(&mut out);
        out
    }

    /// KES's families, then kesh's (all of them sort after `kes_`): the `/v1/metrics/kesh`
    /// page for Prometheus.
    pub fn render_all(&self, keystore: &crate::keystore::KeystoreStats) -> String {
        let mut out = String::with_capacity(8192);
        self.render_kes_into(&mut out);
        self.render_kesh_into(&mut out, keystore);
        out
    }

    fn render_kes_into(&self, out: &mut String) {
        let stats = ProcessStats::read();
        scalar(
            out,
            "kes_http_request_active",
            "gauge",
            "Number of active requests that are not finished, yet.",
            self.active.load(Ordering::Relaxed),
        );
        for (name, help, map) in [
            ("kes_http_request_error", "Number of request that failed due to some error. (HTTP 4xx status code)", &self.error),
            ("kes_http_request_failure", "Number of request that failed due to some internal failure. (HTTP 5xx status code)", &self.failure),
            ("kes_http_request_success", "Number of requests that have been served successfully.", &self.success),
        ] {
            let map = map.lock().ignore_poison();
            if map.is_empty() {
                continue;
            }
            family(out, name, "counter", help);
            for (code, n) in map.iter() {
                let _ = writeln!(out, "{name}{{code=\"{code}\"}} {n}");
            }
        }
        family(
            out,
            "kes_http_response_time",
            "histogram",
            "Histogram of request response times spawning from 10ms to 10s.",
        );
        self.response_time.render(out, "kes_http_response_time", "");
        scalar(
            out,
            "kes_log_audit_events",
            "counter",
            "Number of audit log events written to audit log targets.",
            self.audit_events.load(Ordering::Relaxed),
        );
        scalar(
            out,
            "kes_log_error_events",
            "counter",
            "Number of error log events written to error log targets.",
            self.error_events.load(Ordering::Relaxed),
        );
        let uptime = (self.started.elapsed().as_millis() / 10) as f64 / 100.0;
        let cpus = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1);
        for (name, help, value) in [
            (
                "kes_system_mem_heap_objects",
                "Number of objects on the heap (not tracked by kesh; always 0).",
                0.0,
            ),
            (
                "kes_system_mem_heap_used",
                "Number of bytes of the process data segment (heap) in use.",
                stats.heap_bytes as f64,
            ),
            (
                "kes_system_mem_stack_used",
                "Number of bytes of the main stack in use.",
                stats.stack_bytes as f64,
            ),
            (
                "kes_system_num_cpu",
                "Number of available CPU cores.",
                cpus as f64,
            ),
            (
                "kes_system_num_cpu_used",
                "Number of CPU cores used by the server.",
                cpus as f64,
            ),
            (
                "kes_system_num_threads",
                "Number of OS threads of the process.",
                stats.threads as f64,
            ),
            (
                "kes_system_up_time",
                "The time the server has been up and running in seconds.",
                uptime,
            ),
        ] {
            family(out, name, "gauge", help);
            let _ = writeln!(out, "{name} {value}");
        }
    }

    fn render_kesh_into(&self, out: &mut String, keystore: &crate::keystore::KeystoreStats) {
        // Families in name order, as the test below checks.
        if let Some(pool) = keystore.pool {
            let name = "kesh_hsm_call_seconds_total";
            family(
                out,
                name,
                "counter",
                "Time keystore calls spent running on an HSM session: the device's own time, round trips included.",
            );
            let _ = writeln!(out, "{name} {}", pool.call_seconds);
        }
        if let Some(refused) = keystore.login_refused {
            family(
                out,
                "kesh_hsm_login_refused",
                "gauge",
                "1 while the HSM refuses the PIN: kesh makes no login attempt until the operator reloads (SIGHUP).",
            );
            let _ = writeln!(out, "kesh_hsm_login_refused {}", u8::from(refused));
        }
        if let Some(pool) = keystore.pool {
            for (name, help, value) in [
                (
                    "kesh_hsm_session_acquired_total",
                    "Keystore calls that took an HSM session.",
                    pool.acquired as f64,
                ),
                (
                    "kesh_hsm_session_inline_total",
                    "Keystore calls run on the asking runtime thread (a fast local device), not handed to an HSM worker thread.",
                    pool.inline as f64,
                ),
                (
                    "kesh_hsm_session_wait_seconds_total",
                    "Time keystore calls spent waiting for a free HSM session.",
                    pool.wait_seconds,
                ),
            ] {
                family(out, name, "counter", help);
                let _ = writeln!(out, "{name} {value}");
            }
            family(
                out,
                "kesh_hsm_sessions",
                "gauge",
                "HSM sessions in the pool, by state.",
            );
            let _ = writeln!(out, "kesh_hsm_sessions{{state=\"in_use\"}} {}", pool.in_use);
            let _ = writeln!(out, "kesh_hsm_sessions{{state=\"size\"}} {}", pool.size);
        }
        scalar(
            out,
            "kesh_keystore_busy_total",
            "counter",
            "Keystore calls refused because no HSM session became free in time.",
            self.keystore_busy.load(Ordering::Relaxed),
        );
        {
            let errors = self.keystore_errors.lock().ignore_poison();
            if !errors.is_empty() {
                family(
                    out,
                    "kesh_keystore_errors_total",
                    "counter",
                    "Failed keystore calls by operation and error kind.",
                );
                for ((op, kind), n) in errors.iter() {
                    let _ = writeln!(
                        out,
                        "kesh_keystore_errors_total{{kind=\"{kind}\",op=\"{op}\"}} {n}"
                    );
                }
            }
        }
        {
            let lat = self.keystore_latency.lock().ignore_poison();
            if !lat.is_empty() {
                family(
                    out,
                    "kesh_keystore_operation_seconds",
                    "histogram",
                    "Keystore call latency in seconds by operation, including the wait for an HSM session.",
                );
                for (op, h) in lat.iter() {
                    h.render(
                        out,
                        "kesh_keystore_operation_seconds",
                        &format!("op=\"{op}\""),
                    );
                }
            }
        }
        if let Some(n) = keystore.unreadable_key_files {
            scalar(
                out,
                "kesh_keystore_unreadable_key_files",
                "gauge",
                "Key files of the soft keystore's directory skipped because they could not be read, opened or named.",
                n,
            );
        }
        scalar(
            out,
            "kesh_policy_denials_total",
            "counter",
            "Requests refused by authorization.",
            self.denials.load(Ordering::Relaxed),
        );
        {
            let seals = self.seals.lock().ignore_poison();
            if !seals.is_empty() {
                family(
                    out,
                    "kesh_seals_total",
                    "counter",
                    "Seals (generate and encrypt) per key by this process; random-IV GCM is bounded to about 2^32 per key.",
                );
                for (key, n) in seals.iter() {
                    let _ = writeln!(out, "kesh_seals_total{{key=\"{key}\"}} {n}");
                }
            }
        }
    }
}

/// A family of one unlabelled sample.
fn scalar(out: &mut String, name: &str, kind: &str, help: &str, value: impl std::fmt::Display) {
    family(out, name, kind, help);
    let _ = writeln!(out, "{name} {value}");
}

/// kesh's per-key-version families for `/v1/metrics/kesh` (never `/v1/metrics`): seals and
/// unseals per key version by this process since start.
pub fn render_version_usage(usage: &[crate::keystore::usage::VersionUsage]) -> String {
    let mut out = String::new();
    if usage.is_empty() {
        return out;
    }
    family(
        &mut out,
        "kesh_key_version_seals_total",
        "counter",
        "Seals (generate and encrypt) per key version by this process.",
    );
    for u in usage {
        let _ = writeln!(
            out,
            "kesh_key_version_seals_total{{key=\"{}\",version=\"{}\"}} {}",
            u.key, u.version, u.seals
        );
    }
    family(
        &mut out,
        "kesh_key_version_unseals_total",
        "counter",
        "Unseals (decrypt) per key version by this process: a version at zero everywhere for a cryptoperiod is a candidate for destroy-version.",
    );
    for u in usage {
        let _ = writeln!(
            out,
            "kesh_key_version_unseals_total{{key=\"{}\",version=\"{}\"}} {}",
            u.key, u.version, u.unseals
        );
    }
    out
}

fn family(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

/// Memory and thread figures of this process (Linux `/proc/self/status`; zeros elsewhere).
#[derive(Debug, Clone, Copy, Default)]
pub struct ProcessStats {
    /// The data segment (`VmData`), reported as heap, in bytes.
    pub heap_bytes: u64,
    /// Stack of the main thread (`VmStk`), in bytes.
    pub stack_bytes: u64,
    /// OS threads.
    pub threads: u64,
}

impl ProcessStats {
    /// Reads `/proc/self/status` now.
    pub fn read() -> Self {
        let Ok(status) = std::fs::read_to_string("/proc/self/status") else {
            return ProcessStats::default();
        };
        let mut s = ProcessStats::default();
        for line in status.lines() {
            let mut parts = line.split_whitespace();
            let (Some(key), Some(value)) = (parts.next(), parts.next()) else {
                continue;
            };
            let value: u64 = value.parse().unwrap_or(0);
            match key {
                "VmData:" => s.heap_bytes = value * 1024,
                "VmStk:" => s.stack_bytes = value * 1024,
                "Threads:" => s.threads = value,
                _ => {}
            }
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_families_in_order() {
        let m = Metrics::new();
        m.request_finished(200, Duration::from_millis(20));
        m.request_finished(404, Duration::from_millis(2));
        m.keystore_call("generate", Duration::from_micros(300), None);
        m.keystore_call("generate", Duration::from_micros(300), Some("busy"));
        m.sealed("k1");
        let text = m.render_all(&crate::keystore::KeystoreStats {
            pool: Some(crate::keystore::PoolStats {
                size: 4,
                in_use: 1,
                acquired: 10,
                inline: 6,
                wait_seconds: 0.5,
                call_seconds: 0.25,
            }),
            login_refused: Some(false),
            unreadable_key_files: Some(2),
        });
        assert!(
            text.contains("kesh_hsm_sessions{state=\"in_use\"} 1\n"),
            "{text}"
        );
        assert!(
            text.contains("kesh_hsm_session_wait_seconds_total 0.5\n"),
            "{text}"
        );
        assert!(
            text.contains("kesh_hsm_call_seconds_total 0.25\n"),
            "{text}"
        );
        assert!(
            text.contains("kes_http_request_success{code=\"200\"} 1\n"),
            "{text}"
        );
        assert!(text.contains("kes_http_request_error{code=\"404\"} 1\n"));
        assert!(!text.contains("kes_http_request_failure"));
        assert!(text.contains("kes_http_response_time_bucket{le=\"0.01\"} 1\n"));
        assert!(text.contains("kes_http_response_time_bucket{le=\"0.05\"} 2\n"));
        assert!(text.contains("kes_http_response_time_count 2\n"));
        assert!(text.contains("kesh_keystore_errors_total{kind=\"busy\",op=\"generate\"} 1\n"));
        assert!(text.contains("kesh_keystore_operation_seconds_count{op=\"generate\"} 2\n"));
        assert!(text.contains("kesh_keystore_busy_total 1\n"));
        assert!(text.contains("kesh_seals_total{key=\"k1\"} 1\n"));
        assert!(text.contains("kesh_hsm_login_refused 0\n"));
        assert!(text.contains("kesh_keystore_unreadable_key_files 2\n"));
        let kes = m.render_kes();
        assert!(!kes.contains("kesh_"), "{kes}");
        // The full page begins with KES's families (values such as uptime move between renders).
        let types = |page: &str| -> Vec<String> {
            page.lines()
                .filter(|l| l.starts_with("# TYPE kes_"))
                .map(str::to_owned)
                .collect()
        };
        assert_eq!(types(&text), types(&kes));
        assert!(text.starts_with("# HELP kes_http_request_active"));
        let names: Vec<&str> = text
            .lines()
            .filter_map(|l| l.strip_prefix("# TYPE "))
            .map(|l| l.split(' ').next().unwrap())
            .collect();
        let mut sorted = names.clone();
        sorted.sort();
        assert_eq!(names, sorted);
    }
}
