//! `kesh bench`: an end-to-end load generator for a KES server (kesh or KES itself).
//!
//! It talks to the server the way MinIO's client does: HTTP/2 with every request multiplexed
//! over ONE mTLS connection (ALPN `h2`), or, with [`Transport::Http1`], a fixed number of
//! HTTP/1.1 keep-alive connections shared by the workers. Each worker loops for the run's
//! duration; requests carry MinIO-shaped contexts (`{"<bucket>":"<bucket>/<object>"}`, a new
//! object per request) and every response is checked: a generated plaintext is 32 bytes, a
//! decrypt returns exactly the plaintext generated with that ciphertext and context.
//!
//! Latencies go into a log-linear histogram (≤ 1.6 % relative error, fixed memory, so a long
//! run allocates nothing per request for bookkeeping). With a server PID, the server's CPU
//! time (utime + stime from `/proc/PID/stat`) over the measured window is divided by the
//! operations completed in it, and its resident set size is read from `/proc/PID/status`.

use std::fmt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine as _;
use bytes::Bytes;
use http::{header, Method, Request, StatusCode, Uri};
use http_body_util::{BodyExt, Full, Limited};
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::pki_types::ServerName;
use rustls::ClientConfig;
use serde::Serialize;
use tokio::net::TcpStream;
use tokio::sync::Mutex;
use tokio_rustls::TlsConnector;

use crate::api;
use crate::client::{self, Client, ClientError};

/// Responses larger than this are an error (generate and decrypt answers are ~200 bytes).
const MAX_RESPONSE: usize = 64 << 10;

/// How many distinct (ciphertext, context) pairs a decrypt run cycles through.
const DECRYPT_SAMPLES: usize = 256;

/// The operation each request performs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Op {
    /// `POST /v1/key/generate/{key}`: a new data key (MinIO's PUT path).
    Generate,
    /// `POST /v1/key/decrypt/{key}` of data keys generated before the run (MinIO's GET path).
    Decrypt,
    /// Generate, then decrypt what was generated: two operations per round.
    Mixed,
    /// `GET /v1/key/describe/{key}`: no key material, the server's fixed cost.
    Describe,
}

impl Op {
    /// The name `--op` takes and reports print.
    pub fn as_str(self) -> &'static str {
        match self {
            Op::Generate => "generate",
            Op::Decrypt => "decrypt",
            Op::Mixed => "mixed",
            Op::Describe => "describe",
        }
    }
}

/// How requests reach the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    /// One connection, all workers' requests multiplexed on it (as MinIO does).
    Http2,
    /// `connections` HTTP/1.1 keep-alive connections; worker `i` uses connection `i % n`.
    Http1 {
        /// How many.
        connections: usize,
    },
}

/// What to run.
#[derive(Debug, Clone)]
pub struct Settings {
    /// The operation to measure.
    pub op: Op,
    /// The key to use; created when missing.
    pub key: String,
    /// Requests in flight at once (one worker each).
    pub concurrency: usize,
    /// The measured window.
    pub duration: Duration,
    /// Load before the measured window, not counted (connections warm, pools filled).
    pub warmup: Duration,
    /// HTTP/2 or HTTP/1.1.
    pub transport: Transport,
    /// The server's process, for CPU time per operation and RSS.
    pub server_pid: Option<u32>,
}

/// Errors that stop a run before it measures anything.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error("invalid settings: {0}")]
    /// The settings cannot be run.
    Settings(String),
    #[error("cannot connect: {0}")]
    /// No connection to the server.
    Connect(String),
    #[error("setup failed: {0}")]
    /// The key could not be created or used before the run.
    Setup(String),
    /// The server's process could not be read (`/proc/<pid>`).
    #[error("cannot read the server process {pid}: {error}")]
    Process {
        /// The pid given.
        pid: u32,
        /// Why.
        error: String,
    },
}

/// Latencies in microseconds.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Latency {
    /// Median.
    pub p50_us: f64,
    /// 90th percentile.
    pub p90_us: f64,
    /// 99th percentile.
    pub p99_us: f64,
    /// Slowest.
    pub max_us: f64,
}

/// The server process over the measured window.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct ServerUsage {
    /// Its process id.
    pub pid: u32,
    /// utime + stime spent in the window, seconds.
    pub cpu_s: f64,
    /// `cpu_s` per completed operation, microseconds.
    pub cpu_us_per_op: f64,
    /// Resident set size at the end of the window (`VmRSS`), KiB.
    pub rss_kb: u64,
    /// Peak resident set size since the server started (`VmHWM`), KiB.
    pub rss_peak_kb: u64,
    /// Resident set size before the warmup, KiB.
    pub rss_before_kb: u64,
    /// Voluntary context switches (a thread parked: futex, I/O wait) of all the server's
    /// threads in the window, per completed operation. Threads that ended within the window
    /// are not counted.
    pub voluntary_switches_per_op: f64,
    /// Involuntary context switches (preempted) per completed operation.
    pub involuntary_switches_per_op: f64,
}

/// One run's result; `--json` prints it as one JSON object.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// The operation measured.
    pub op: Op,
    /// `h2` or `http1`.
    pub proto: &'static str,
    /// Connections used.
    pub connections: usize,
    /// Requests in flight at once.
    pub concurrency: usize,
    /// The key used.
    pub key: String,
    /// The measured window actually elapsed, seconds.
    pub duration_s: f64,
    /// The warmup, seconds.
    pub warmup_s: f64,
    /// Operations that completed successfully (and checked) in the window.
    pub ops: u64,
    /// Failed operations in the window: error status, transport error or a wrong answer.
    pub errors: u64,
    /// `ops` per second of the window.
    pub ops_per_sec: f64,
    #[serde(flatten)]
    /// Latency percentiles of the completed operations.
    pub latency: Latency,
    /// The server's CPU and memory, when its pid was given.
    pub server: Option<ServerUsage>,
    /// Time the server's keystore spent in device calls per completed operation,
    /// microseconds (`kesh_hsm_call_seconds_total` over the window): what the HSM itself
    /// costs inside the server. `None` for a keystore without sessions, or when the
    /// identity may not read `/v1/metrics/kesh`.
    pub device_us_per_op: Option<f64>,
    /// The first failure seen (warmup included), to say what went wrong.
    pub first_error: Option<String>,
}

impl Report {
    /// One line of `key=value` pairs, for scripts that do not parse JSON.
    pub fn summary_line(&self) -> String {
        let mut s = format!(
            "kesh-bench op={} proto={} conns={} c={} ops={} errors={} duration_s={:.3} ops_per_s={:.1} p50_us={:.1} p90_us={:.1} p99_us={:.1} max_us={:.1}",
            self.op.as_str(),
            self.proto,
            self.connections,
            self.concurrency,
            self.ops,
            self.errors,
            self.duration_s,
            self.ops_per_sec,
            self.latency.p50_us,
            self.latency.p90_us,
            self.latency.p99_us,
            self.latency.max_us,
        );
        if let Some(d) = self.device_us_per_op {
            s.push_str(&format!(" device_us_per_op={d:.2}"));
        }
        if let Some(u) = &self.server {
            s.push_str(&format!(
                " cpu_us_per_op={:.2} vcsw_per_op={:.3} ivcsw_per_op={:.3} rss_kb={} rss_peak_kb={} rss_before_kb={}",
                u.cpu_us_per_op,
                u.voluntary_switches_per_op,
                u.involuntary_switches_per_op,
                u.rss_kb,
                u.rss_peak_kb,
                u.rss_before_kb
            ));
        }
        s
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ms = |us: f64| us / 1000.0;
        writeln!(
            f,
            "{} on key '{}': {} ({} connection{}), concurrency {}, {:.1} s measured after {:.1} s warmup",
            self.op.as_str(),
            self.key,
            self.proto,
            self.connections,
            if self.connections == 1 { "" } else { "s" },
            self.concurrency,
            self.duration_s,
            self.warmup_s
        )?;
        writeln!(
            f,
            "  throughput  {:.1} ops/s ({} ops)",
            self.ops_per_sec, self.ops
        )?;
        writeln!(
            f,
            "  latency     p50 {:.3} ms   p90 {:.3} ms   p99 {:.3} ms   max {:.3} ms",
            ms(self.latency.p50_us),
            ms(self.latency.p90_us),
            ms(self.latency.p99_us),
            ms(self.latency.max_us)
        )?;
        writeln!(f, "  errors      {}", self.errors)?;
        if let Some(d) = self.device_us_per_op {
            writeln!(
                f,
                "  device      {d:.1} µs/op in HSM calls (the server's own count)"
            )?;
        }
        if let Some(e) = &self.first_error {
            writeln!(f, "  first error {e}")?;
        }
        if let Some(u) = &self.server {
            writeln!(
                f,
                "  server      {:.1} µs CPU/op ({:.2} s CPU), {:.2} voluntary + {:.2} involuntary context switches/op, RSS {:.1} MiB (before {:.1} MiB, peak {:.1} MiB)",
                u.cpu_us_per_op,
                u.cpu_s,
                u.voluntary_switches_per_op,
                u.involuntary_switches_per_op,
                u.rss_kb as f64 / 1024.0,
                u.rss_before_kb as f64 / 1024.0,
                u.rss_peak_kb as f64 / 1024.0
            )?;
        }
        write!(f, "{}", self.summary_line())
    }
}

/// A log-linear latency histogram over nanoseconds: 64 sub-buckets per power of two.
#[derive(Clone)]
struct Histogram {
    counts: Box<[u64; Histogram::BUCKETS]>,
    total: u64,
    max: u64,
}

impl Histogram {
    const SUB_BITS: u32 = 6;
    const SUB: u64 = 1 << Self::SUB_BITS;
    /// Shifts 0..=57 (values up to 2^64), 64 buckets each, the first 64 for exact values.
    const BUCKETS: usize = 59 * 64;

    fn new() -> Self {
        Histogram {
            counts: Box::new([0; Self::BUCKETS]),
            total: 0,
            max: 0,
        }
    }

    fn index(v: u64) -> usize {
        if v < 2 * Self::SUB {
            return v as usize;
        }
        let exp = 63 - v.leading_zeros();
        let shift = exp - Self::SUB_BITS;
        ((shift as u64 + 1) * Self::SUB + ((v >> shift) - Self::SUB)) as usize
    }

    /// The midpoint of the values that land in bucket `i`.
    fn value(i: usize) -> u64 {
        let i = i as u64;
        if i < 2 * Self::SUB {
            return i;
        }
        let shift = i / Self::SUB - 1;
        let low = (Self::SUB + i % Self::SUB) << shift;
        low + (1u64 << shift) / 2
    }

    fn record(&mut self, nanos: u64) {
        self.counts[Self::index(nanos)] += 1;
        self.total += 1;
        self.max = self.max.max(nanos);
    }

    fn merge(&mut self, other: &Histogram) {
        for (a, b) in self.counts.iter_mut().zip(other.counts.iter()) {
            *a += b;
        }
        self.total += other.total;
        self.max = self.max.max(other.max);
    }

    /// The `q` quantile (0 < q ≤ 1) in nanoseconds; never above the exact maximum.
    fn quantile(&self, q: f64) -> u64 {
        if self.total == 0 {
            return 0;
        }
        let rank = ((q * self.total as f64).ceil() as u64).clamp(1, self.total);
        let mut seen = 0;
        for (i, c) in self.counts.iter().enumerate() {
            seen += c;
            if seen >= rank {
                return Self::value(i).min(self.max);
            }
        }
        self.max
    }

    fn latency(&self) -> Latency {
        let us = |n: u64| n as f64 / 1000.0;
        Latency {
            p50_us: us(self.quantile(0.50)),
            p90_us: us(self.quantile(0.90)),
            p99_us: us(self.quantile(0.99)),
            max_us: us(self.max),
        }
    }
}

type Body = Full<Bytes>;

/// One worker's way to the server.
enum Lane {
    H2(http2::SendRequest<Body>),
    H1(Arc<Mutex<http1::SendRequest<Body>>>),
}

impl Lane {
    fn closed(&self) -> bool {
        match self {
            Lane::H2(s) => s.is_closed(),
            // A closed HTTP/1 connection fails the next request; the worker stops then.
            Lane::H1(_) => false,
        }
    }

    async fn send(&mut self, req: Request<Body>) -> Result<(StatusCode, Bytes), String> {
        async fn body(resp: http::Response<hyper::body::Incoming>) -> Result<Bytes, String> {
            Ok(Limited::new(resp.into_body(), MAX_RESPONSE)
                .collect()
                .await
                .map_err(|e| format!("reading the response: {e}"))?
                .to_bytes())
        }
        let (status, headers, bytes) = match self {
            Lane::H2(sender) => {
                sender.ready().await.map_err(|e| format!("h2: {e}"))?;
                let resp = sender
                    .send_request(req)
                    .await
                    .map_err(|e| format!("h2: {e}"))?;
                (resp.status(), resp.headers().clone(), body(resp).await?)
            }
            Lane::H1(conn) => {
                // The connection serves one exchange at a time: hold it until the body is read.
                let mut sender = conn.lock().await;
                sender.ready().await.map_err(|e| format!("http1: {e}"))?;
                let resp = sender
                    .send_request(req)
                    .await
                    .map_err(|e| format!("http1: {e}"))?;
                (resp.status(), resp.headers().clone(), body(resp).await?)
            }
        };
        if status != StatusCode::OK {
            return Err(format!(
                "status {}: {}",
                status.as_u16(),
                client::parse_error(status, &headers, &bytes).message
            ));
        }
        Ok((status, bytes))
    }
}

/// Where requests go: URIs and the Host header, per protocol.
struct Target {
    authority: String,
    h2: bool,
    key_escaped: String,
}

impl Target {
    fn uri(&self, api: &str) -> Result<Uri, String> {
        let path = format!("{api}{}", self.key_escaped);
        let text = if self.h2 {
            format!("https://{}{path}", self.authority)
        } else {
            path
        };
        text.parse().map_err(|e| format!("{text}: {e}"))
    }

    fn request(&self, method: Method, uri: &Uri, body: Option<Vec<u8>>) -> Request<Body> {
        let mut req = Request::builder().method(method).uri(uri.clone());
        if !self.h2 {
            req = req.header(header::HOST, self.authority.as_str());
        }
        if body.is_some() {
            req = req.header(header::CONTENT_TYPE, "application/json");
        }
        // Method, URI and headers are valid by construction (parsed URI, static names).
        req.body(Full::new(body.map(Bytes::from).unwrap_or_default()))
            .unwrap_or_else(|_| Request::new(Full::new(Bytes::new())))
    }
}

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// The context MinIO binds an object's key to: `{"<bucket>":"<bucket>/<object>"}`.
fn minio_context(worker: usize, n: u64) -> Vec<u8> {
    let bucket = format!("bench-bucket-{}", worker % 8);
    format!(r#"{{"{bucket}":"{bucket}/objects/w{worker}/{n:08}.bin"}}"#).into_bytes()
}

fn generate_body(context: &[u8]) -> Vec<u8> {
    format!(r#"{{"context":"{}"}}"#, b64(context)).into_bytes()
}

fn decrypt_body(ciphertext: &[u8], context: &[u8]) -> Vec<u8> {
    format!(
        r#"{{"ciphertext":"{}","context":"{}"}}"#,
        b64(ciphertext),
        b64(context)
    )
    .into_bytes()
}

/// A data key as generated: what a decrypt must give back.
struct Sample {
    context: Vec<u8>,
    ciphertext: Vec<u8>,
    plaintext: zeroize::Zeroizing<Vec<u8>>,
}

/// URIs built once per run.
struct Uris {
    generate: Uri,
    decrypt: Uri,
    describe: Uri,
}

async fn generate(
    lane: &mut Lane,
    target: &Target,
    uris: &Uris,
    context: Vec<u8>,
) -> Result<Sample, String> {
    let req = target.request(Method::POST, &uris.generate, Some(generate_body(&context)));
    let (_, bytes) = lane.send(req).await?;
    let resp: api::GenerateKeyResponse =
        serde_json::from_slice(&bytes).map_err(|e| format!("generate response: {e}"))?;
    if resp.plaintext.0.len() != 32 {
        return Err(format!(
            "generate returned a {}-byte plaintext, not 32",
            resp.plaintext.0.len()
        ));
    }
    if resp.ciphertext.0.is_empty() {
        return Err("generate returned an empty ciphertext".into());
    }
    Ok(Sample {
        context,
        ciphertext: resp.ciphertext.0,
        plaintext: resp.plaintext.0,
    })
}

async fn decrypt(
    lane: &mut Lane,
    target: &Target,
    uris: &Uris,
    sample: &Sample,
) -> Result<(), String> {
    let body = decrypt_body(&sample.ciphertext, &sample.context);
    let req = target.request(Method::POST, &uris.decrypt, Some(body));
    let (_, bytes) = lane.send(req).await?;
    let resp: api::DecryptKeyResponse =
        serde_json::from_slice(&bytes).map_err(|e| format!("decrypt response: {e}"))?;
    if resp.plaintext.0[..] != sample.plaintext[..] {
        return Err("decrypt returned a plaintext other than the generated one".into());
    }
    Ok(())
}

async fn describe(lane: &mut Lane, target: &Target, uris: &Uris, key: &str) -> Result<(), String> {
    let req = target.request(Method::GET, &uris.describe, None);
    let (_, bytes) = lane.send(req).await?;
    let resp: api::DescribeKeyResponse =
        serde_json::from_slice(&bytes).map_err(|e| format!("describe response: {e}"))?;
    if resp.name != key {
        return Err(format!("describe returned key '{}'", resp.name));
    }
    Ok(())
}

/// One TLS connection speaking `h2` (or HTTP/1.1), its driver spawned.
async fn connect(
    addr: &str,
    server_name: &ServerName<'static>,
    tls: &ClientConfig,
    h2: bool,
) -> Result<Lane, BenchError> {
    let mut tls = tls.clone();
    tls.alpn_protocols = vec![if h2 {
        b"h2".to_vec()
    } else {
        b"http/1.1".to_vec()
    }];
    let tcp = TcpStream::connect(addr)
        .await
        .map_err(|e| BenchError::Connect(format!("{addr}: {e}")))?;
    tcp.set_nodelay(true)
        .map_err(|e| BenchError::Connect(format!("{addr}: TCP_NODELAY: {e}")))?;
    let stream = TlsConnector::from(Arc::new(tls))
        .connect(server_name.clone(), tcp)
        .await
        .map_err(|e| BenchError::Connect(format!("{addr}: TLS: {e}")))?;
    let io = TokioIo::new(stream);
    if h2 {
        let (sender, conn) = http2::Builder::new(TokioExecutor::new())
            .handshake(io)
            .await
            .map_err(|e| BenchError::Connect(format!("{addr}: h2 handshake: {e}")))?;
        tokio::spawn(conn);
        Ok(Lane::H2(sender))
    } else {
        let (sender, conn) = http1::handshake(io)
            .await
            .map_err(|e| BenchError::Connect(format!("{addr}: http1 handshake: {e}")))?;
        tokio::spawn(conn);
        Ok(Lane::H1(Arc::new(Mutex::new(sender))))
    }
}

/// A snapshot of a process: CPU ticks used and memory.
#[derive(Debug, Clone, Copy)]
struct ProcSample {
    ticks: u64,
    rss_kb: u64,
    hwm_kb: u64,
    /// Summed over the process's threads: `/proc/PID/status` counts the main thread only.
    voluntary_switches: u64,
    involuntary_switches: u64,
}

fn proc_sample(pid: u32) -> Result<ProcSample, BenchError> {
    let err = |error: String| BenchError::Process { pid, error };
    let stat =
        std::fs::read_to_string(format!("/proc/{pid}/stat")).map_err(|e| err(e.to_string()))?;
    // Fields after the command name (which may hold spaces and parentheses): state is field 3,
    // utime 14 and stime 15 (proc(5)).
    let rest = stat
        .rsplit_once(')')
        .map(|(_, r)| r)
        .ok_or_else(|| err("unreadable stat".into()))?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let field = |n: usize| -> Result<u64, BenchError> {
        fields
            .get(n - 3)
            .and_then(|f| f.parse().ok())
            .ok_or_else(|| err(format!("stat field {n} missing")))
    };
    let ticks = field(14)? + field(15)?;
    let status =
        std::fs::read_to_string(format!("/proc/{pid}/status")).map_err(|e| err(e.to_string()))?;
    let kb = |name: &str| status_field(&status, name).unwrap_or(0);
    let (mut voluntary_switches, mut involuntary_switches) = (0, 0);
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).map_err(|e| err(e.to_string()))?;
    for task in tasks.flatten() {
        // A thread that ended since the listing has nothing left to count.
        if let Ok(status) = std::fs::read_to_string(task.path().join("status")) {
            voluntary_switches += status_field(&status, "voluntary_ctxt_switches:").unwrap_or(0);
            involuntary_switches +=
                status_field(&status, "nonvoluntary_ctxt_switches:").unwrap_or(0);
        }
    }
    Ok(ProcSample {
        ticks,
        rss_kb: kb("VmRSS:"),
        hwm_kb: kb("VmHWM:"),
        voluntary_switches,
        involuntary_switches,
    })
}

/// A numeric field of a `/proc/.../status` file (`VmRSS:  1234 kB` → 1234).
fn status_field(status: &str, name: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|l| l.strip_prefix(name))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

#[allow(unsafe_code, reason = "sysconf(_SC_CLK_TCK): std does not offer it")]
fn clock_ticks_per_second() -> f64 {
    // SAFETY: sysconf only reads a system constant; it has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if hz > 0 {
        hz as f64
    } else {
        100.0
    }
}

/// What one worker measured.
struct Tally {
    hist: Histogram,
    errors: u64,
    first_error: Option<String>,
}

struct Shared {
    target: Target,
    uris: Uris,
    key: String,
    op: Op,
    samples: Vec<Sample>,
    /// Operations started at or after this instant are measured.
    measure_from: Instant,
    /// No operation starts after this instant.
    end: Instant,
}

async fn worker(shared: Arc<Shared>, mut lane: Lane, id: usize) -> Tally {
    let mut tally = Tally {
        hist: Histogram::new(),
        errors: 0,
        first_error: None,
    };
    let mut n: u64 = 0;
    let mut pending: Option<Sample> = None;
    loop {
        let started = Instant::now();
        if started >= shared.end || lane.closed() {
            break;
        }
        let result = match shared.op {
            Op::Generate => generate(
                &mut lane,
                &shared.target,
                &shared.uris,
                minio_context(id, n),
            )
            .await
            .map(drop),
            Op::Decrypt => {
                let i = (id.wrapping_mul(7919) + n as usize) % shared.samples.len();
                decrypt(&mut lane, &shared.target, &shared.uris, &shared.samples[i]).await
            }
            Op::Mixed => match pending.take() {
                None => generate(
                    &mut lane,
                    &shared.target,
                    &shared.uris,
                    minio_context(id, n),
                )
                .await
                .map(|s| pending = Some(s)),
                Some(s) => decrypt(&mut lane, &shared.target, &shared.uris, &s).await,
            },
            Op::Describe => describe(&mut lane, &shared.target, &shared.uris, &shared.key).await,
        };
        n += 1;
        let measured = started >= shared.measure_from;
        match result {
            Ok(()) if measured => tally.hist.record(started.elapsed().as_nanos() as u64),
            Ok(()) => {}
            Err(e) => {
                if measured {
                    tally.errors += 1;
                }
                if tally.first_error.is_none() {
                    tally.first_error = Some(e);
                }
            }
        }
    }
    tally
}

/// Runs the load described by `settings` against the server `client` points at.
///
/// `client` supplies the address, TLS settings and credentials; it is also used (one
/// connection per call) to create the key when it is missing.
pub async fn run(client: &Client, settings: &Settings) -> Result<Report, BenchError> {
    if settings.concurrency == 0 {
        return Err(BenchError::Settings(
            "concurrency must be at least 1".into(),
        ));
    }
    if settings.duration.is_zero() {
        return Err(BenchError::Settings("duration must be positive".into()));
    }
    match client.create_key(&settings.key).await {
        Ok(()) => {}
        Err(ClientError::Api(e)) if e == client::errors::KEY_EXISTS => {}
        Err(e) => {
            return Err(BenchError::Setup(format!(
                "creating key '{}': {e}",
                settings.key
            )))
        }
    }

    let (addr, server_name, tls) = client.transport();
    let (h2, connections) = match settings.transport {
        Transport::Http2 => (true, 1),
        Transport::Http1 { connections } => {
            if connections == 0 {
                return Err(BenchError::Settings("--conns must be at least 1".into()));
            }
            (false, connections.min(settings.concurrency))
        }
    };
    let mut conns = Vec::with_capacity(connections);
    for _ in 0..connections {
        conns.push(connect(addr, &server_name, &tls, h2).await?);
    }
    let lane = |i: usize| match &conns[i % conns.len()] {
        Lane::H2(s) => Lane::H2(s.clone()),
        Lane::H1(c) => Lane::H1(c.clone()),
    };
    let target = Target {
        authority: addr.to_owned(),
        h2,
        key_escaped: super::escape_segment(&settings.key),
    };
    let uris = Uris {
        generate: target.uri("/v1/key/generate/").map_err(BenchError::Setup)?,
        decrypt: target.uri("/v1/key/decrypt/").map_err(BenchError::Setup)?,
        describe: target.uri("/v1/key/describe/").map_err(BenchError::Setup)?,
    };

    let mut samples = Vec::new();
    if settings.op == Op::Decrypt {
        let mut setup = lane(0);
        for i in 0..DECRYPT_SAMPLES {
            let ctx = minio_context(usize::MAX - i, i as u64);
            samples.push(
                generate(&mut setup, &target, &uris, ctx)
                    .await
                    .map_err(|e| {
                        BenchError::Setup(format!("generating data keys to decrypt: {e}"))
                    })?,
            );
        }
    }

    let before = match settings.server_pid {
        Some(pid) => Some(proc_sample(pid)?),
        None => None,
    };
    let start = Instant::now();
    let measure_from = start + settings.warmup;
    let end = measure_from + settings.duration;
    let shared = Arc::new(Shared {
        target,
        uris,
        key: settings.key.clone(),
        op: settings.op,
        samples,
        measure_from,
        end,
    });
    let workers: Vec<_> = (0..settings.concurrency)
        .map(|i| tokio::spawn(worker(shared.clone(), lane(i), i)))
        .collect();

    tokio::time::sleep_until(measure_from.into()).await;
    let window_start = Instant::now();
    let at_start = match settings.server_pid {
        Some(pid) => Some(proc_sample(pid)?),
        None => None,
    };
    let device_at_start = device_seconds(client).await;
    tokio::time::sleep_until(end.into()).await;
    let at_end = match settings.server_pid {
        Some(pid) => Some(proc_sample(pid)?),
        None => None,
    };
    let device_at_end = device_seconds(client).await;
    let elapsed = window_start.elapsed();

    let mut hist = Histogram::new();
    let mut errors = 0;
    let mut first_error = None;
    for w in workers {
        let tally = w
            .await
            .map_err(|e| BenchError::Setup(format!("a worker failed: {e}")))?;
        hist.merge(&tally.hist);
        errors += tally.errors;
        if first_error.is_none() {
            first_error = tally.first_error;
        }
    }
    let ops = hist.total;
    let secs = elapsed.as_secs_f64();
    let server = match (settings.server_pid, before, at_start, at_end) {
        (Some(pid), Some(before), Some(a), Some(b)) => {
            let cpu_s = b.ticks.saturating_sub(a.ticks) as f64 / clock_ticks_per_second();
            let per_op = |total: f64| if ops > 0 { total / ops as f64 } else { 0.0 };
            Some(ServerUsage {
                pid,
                cpu_s,
                cpu_us_per_op: per_op(cpu_s * 1e6),
                voluntary_switches_per_op: per_op(
                    b.voluntary_switches.saturating_sub(a.voluntary_switches) as f64,
                ),
                involuntary_switches_per_op: per_op(
                    b.involuntary_switches
                        .saturating_sub(a.involuntary_switches) as f64,
                ),
                rss_kb: b.rss_kb,
                rss_peak_kb: b.hwm_kb,
                rss_before_kb: before.rss_kb,
            })
        }
        _ => None,
    };
    Ok(Report {
        op: settings.op,
        proto: if h2 { "h2" } else { "http1" },
        connections,
        concurrency: settings.concurrency,
        key: settings.key.clone(),
        duration_s: secs,
        warmup_s: settings.warmup.as_secs_f64(),
        ops,
        errors,
        ops_per_sec: if secs > 0.0 { ops as f64 / secs } else { 0.0 },
        latency: hist.latency(),
        server,
        device_us_per_op: match (device_at_start, device_at_end) {
            (Some(a), Some(b)) if ops > 0 => Some((b - a) * 1e6 / ops as f64),
            _ => None,
        },
        first_error,
    })
}

/// The server's `kesh_hsm_call_seconds_total`, if it has one and lets this identity read it.
async fn device_seconds(client: &Client) -> Option<f64> {
    let text = client.kesh_metrics().await.ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix("kesh_hsm_call_seconds_total "))
        .and_then(|v| v.trim().parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_tight_and_monotonic() {
        let mut last = 0;
        for v in [
            0u64,
            1,
            63,
            64,
            127,
            128,
            129,
            1000,
            250_000,
            3_000_000,
            u64::MAX / 2,
        ] {
            let i = Histogram::index(v);
            assert!(i >= last, "index not monotonic at {v}");
            assert!(i < Histogram::BUCKETS);
            last = i;
            let mid = Histogram::value(i);
            let err = (mid as f64 - v as f64).abs() / (v.max(1) as f64);
            assert!(err <= 1.0 / 64.0, "{v}: bucket value {mid}, error {err}");
        }
        assert!(Histogram::index(u64::MAX) < Histogram::BUCKETS);
    }

    #[test]
    fn quantiles_are_ordered_and_bounded_by_max() {
        let mut h = Histogram::new();
        for v in 1..=10_000u64 {
            h.record(v * 1000);
        }
        let l = h.latency();
        assert!(l.p50_us <= l.p90_us && l.p90_us <= l.p99_us && l.p99_us <= l.max_us);
        assert!((l.p50_us - 5000.0).abs() / 5000.0 < 0.02, "{l:?}");
        assert!((l.p99_us - 9900.0).abs() / 9900.0 < 0.02, "{l:?}");
        assert_eq!(l.max_us, 10_000.0);
    }

    #[test]
    fn contexts_look_like_minio_and_vary() {
        let a = minio_context(3, 1);
        let b = minio_context(3, 2);
        assert_ne!(a, b);
        let v: serde_json::Value = serde_json::from_slice(&a).unwrap();
        let (bucket, path) = v.as_object().unwrap().iter().next().unwrap();
        assert!(path.as_str().unwrap().starts_with(&format!("{bucket}/")));
    }

    #[test]
    fn reads_its_own_process() {
        let s = proc_sample(std::process::id()).unwrap();
        assert!(s.rss_kb > 0 && s.hwm_kb >= s.rss_kb);
        assert!(clock_ticks_per_second() > 0.0);
    }
}
