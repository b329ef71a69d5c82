//! `kesh bench`: command-line options for the load generator in [`kesh::client::bench`].

use std::time::Duration;

use clap::{Args, ValueEnum};
use kesh::client::bench::{self, Op, Settings, Transport};
use kesh::client::Client;

use super::client::{credentials, endpoints, trust};
use super::{ClientOpts, Fatal};

#[derive(Debug, Clone, Copy, ValueEnum)]
pub(super) enum OpArg {
    Generate,
    Decrypt,
    Mixed,
    Describe,
}

#[derive(Args, Debug)]
pub(super) struct BenchArgs {
    #[command(flatten)]
    pub opts: ClientOpts,
    /// API key to use instead of KES_API_KEY (visible to other local users in `ps`).
    #[arg(short = 'a', long = "api-key", value_name = "KEY")]
    pub api_key: Option<String>,
    /// The operation each request performs.
    #[arg(long, value_enum, default_value = "generate")]
    pub op: OpArg,
    /// The key to use; created when missing.
    #[arg(long, value_name = "NAME", default_value = "kesh-bench")]
    pub key: String,
    /// Requests in flight at once.
    #[arg(short = 'c', long = "concurrency", default_value_t = 16)]
    pub concurrency: usize,
    /// The measured window (Go duration: 10s, 2500ms).
    #[arg(short = 'd', long = "duration", default_value = "10s")]
    pub duration: String,
    /// Load before the measured window, not counted.
    #[arg(long, default_value = "1s")]
    pub warmup: String,
    /// HTTP/1.1 over --conns connections instead of HTTP/2 over one.
    #[arg(long)]
    pub http1: bool,
    /// HTTP/1.1 connections (default: one per concurrent request).
    #[arg(long, value_name = "N", requires = "http1")]
    pub conns: Option<usize>,
    /// The server's process ID: report its CPU time per operation and its RSS (Linux /proc).
    #[arg(long, value_name = "PID")]
    pub pid: Option<u32>,
}

fn duration(flag: &str, text: &str) -> Result<Duration, Fatal> {
    kesh::config::parse_duration(text).ok_or_else(|| {
        Fatal(format!(
            "{flag} '{text}' is not a duration: write e.g. 10s or 500ms"
        ))
    })
}

pub(super) async fn run(args: BenchArgs) -> Result<(), Fatal> {
    let endpoint = endpoints(args.opts.server.as_deref())
        .into_iter()
        .next()
        .ok_or_else(|| Fatal("KES_SERVER is empty: set it to host:port".into()))?;
    let client = Client::new(
        &endpoint,
        credentials(args.api_key.as_deref())?,
        trust(&args.opts)?,
    )
    .map_err(|e| {
        Fatal(format!(
            "{e}: the server is given as host:port in KES_SERVER or --server"
        ))
    })?;
    let settings = Settings {
        op: match args.op {
            OpArg::Generate => Op::Generate,
            OpArg::Decrypt => Op::Decrypt,
            OpArg::Mixed => Op::Mixed,
            OpArg::Describe => Op::Describe,
        },
        key: args.key,
        concurrency: args.concurrency,
        duration: duration("--duration", &args.duration)?,
        warmup: duration("--warmup", &args.warmup)?,
        transport: if args.http1 {
            Transport::Http1 {
                connections: args.conns.unwrap_or(args.concurrency),
            }
        } else {
            Transport::Http2
        },
        server_pid: args.pid,
    };
    let report = bench::run(&client, &settings)
        .await
        .map_err(|e| Fatal(format!("{endpoint}: {e}")))?;
    if args.opts.json {
        println!(
            "{}",
            serde_json::to_string(&report).map_err(|e| Fatal(e.to_string()))?
        );
    } else {
        println!("{report}");
    }
    if report.ops == 0 {
        return Err(Fatal(format!(
            "no operation succeeded{}",
            report
                .first_error
                .as_deref()
                .map(|e| format!(": {e}"))
                .unwrap_or_default()
        )));
    }
    Ok(())
}
