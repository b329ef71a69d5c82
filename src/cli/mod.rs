//! The `kesh` command line: argument parsing, output and exit codes.
//!
//! Mirrors the `kes` CLI (docs/cli.md; KES: `cmd/kes` at github.com/minio/kes): `server`, the client commands (`key`, `policy`,
//! `identity`, `ls`, `status`, `metric`, `log`) with the same environment variables, plus
//! `migrate`, `hsm probe` and `completion`. Every command prints results on stdout (human
//! tables, or JSON with `--json`) and errors on stderr with a non-zero exit.

mod bench;
mod client;
mod commands;
mod hsm;
mod identity;
mod migrate;
mod output;
mod server;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, CommandFactory, Parser, Subcommand};

/// `kesh --version`: what an auditor needs to match a running binary with its commit and SBOM.
/// The values come from build.rs.
const LONG_VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    "\ncommit: ",
    env!("KESH_GIT_COMMIT"),
    "\nrustc: ",
    env!("KESH_RUSTC_VERSION"),
    "\ntarget: ",
    env!("KESH_BUILD_TARGET"),
    "\nbuild date: ",
    env!("KESH_BUILD_DATE"),
);

#[derive(Parser, Debug)]
#[command(
    name = "kesh",
    version,
    long_version = LONG_VERSION,
    about = "A KES-compatible key-management server backed by a PKCS#11 HSM",
    long_about = "A KES-compatible key-management server backed by a PKCS#11 HSM.\n\n\
        Client commands find the server and credentials like `kes` does:\n  \
        KES_SERVER (or MINIO_KES_SERVER, MINIO_KMS_KES_ENDPOINT; default 127.0.0.1:7373)\n  \
        KES_API_KEY (or MINIO_KES_API_KEY, MINIO_KMS_KES_API_KEY), or\n  \
        KES_CLIENT_CERT and KES_CLIENT_KEY (or MINIO_KES_CERT_FILE/MINIO_KES_KEY_FILE, MINIO_KES_CLIENT_CERT/MINIO_KES_CLIENT_KEY)",
    after_help = "Run `kesh <command> --help` for a command's options. Documentation: docs/cli.md"
)]
pub(crate) struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the server.
    Server(server::ServerArgs),
    /// Create, import, inspect, list, delete and use keys.
    #[command(subcommand)]
    Key(KeyCommand),
    /// Inspect the server's policies.
    #[command(subcommand)]
    Policy(PolicyCommand),
    /// Make API keys and certificates; inspect identities.
    Identity(IdentityArgs),
    /// List keys (default), identities (-i) or policies (-p).
    Ls(LsArgs),
    /// Show the server's status (and its API with --api).
    Status(StatusArgs),
    /// Show the server's metrics: one snapshot, or one per --rate interval.
    Metric(MetricArgs),
    /// Print the server's audit (default) or error log stream.
    Log(LogArgs),
    /// Copy every key of a KES `fs` keystore into kesh's keystore.
    Migrate(migrate::MigrateArgs),
    /// Load a server with generate/decrypt requests; print throughput, latency and server CPU.
    Bench(bench::BenchArgs),
    /// Inspect a PKCS#11 module and token.
    #[command(subcommand)]
    Hsm(HsmCommand),
    /// Print a shell completion script.
    Completion {
        /// The shell: bash, zsh, fish, elvish or powershell.
        shell: clap_complete::Shell,
    },
}

/// Options every client command takes.
#[derive(Args, Debug, Clone, Default)]
pub(crate) struct ClientOpts {
    /// Server address `host:port` (comma-separated for several); overrides KES_SERVER.
    #[arg(short = 's', long = "server", value_name = "HOST:PORT")]
    pub server: Option<String>,
    /// Skip verifying the server's certificate (self-signed or development servers).
    #[arg(short = 'k', long = "insecure")]
    pub insecure: bool,
    /// Trust this CA certificate file (PEM) instead of the system roots; or set SSL_CERT_FILE.
    #[arg(long = "ca", value_name = "FILE")]
    pub ca: Option<PathBuf>,
    /// Print JSON, for scripts.
    #[arg(long)]
    pub json: bool,
    /// Ignored, for `kes` compatibility.
    #[arg(short = 'e', long = "enclave", hide = true)]
    pub enclave: Option<String>,
    /// Ignored, for `kes` compatibility: output is never colored.
    #[arg(long = "color", hide = true, value_parser = ["auto", "never", "always"])]
    pub color: Option<String>,
}

#[derive(Subcommand, Debug)]
pub(crate) enum KeyCommand {
    /// Create new keys.
    Create {
        #[command(flatten)]
        opts: ClientOpts,
        /// Key names.
        #[arg(required = true)]
        names: Vec<String>,
    },
    /// Import a 32-byte key given in base64.
    Import {
        #[command(flatten)]
        opts: ClientOpts,
        name: String,
        /// The key: 32 bytes, base64.
        key: String,
        /// The key's algorithm: AES256 or ChaCha20.
        #[arg(long, default_value = "AES256")]
        cipher: String,
    },
    /// Describe keys.
    Info {
        #[command(flatten)]
        opts: ClientOpts,
        #[arg(required = true)]
        names: Vec<String>,
    },
    /// List keys whose names start with a prefix (`*` or nothing for all).
    Ls {
        #[command(flatten)]
        opts: ClientOpts,
        #[arg(default_value = "*")]
        pattern: String,
    },
    /// Delete keys.
    Rm {
        #[command(flatten)]
        opts: ClientOpts,
        #[arg(required = true)]
        names: Vec<String>,
    },
    /// Generate a data encryption key: its plaintext and its ciphertext under the key.
    Dek {
        #[command(flatten)]
        opts: ClientOpts,
        name: String,
        /// Context bound to the ciphertext (base64).
        context: Option<String>,
    },
    /// Encrypt a message (the argument's bytes) under a key.
    Encrypt {
        #[command(flatten)]
        opts: ClientOpts,
        name: String,
        message: String,
        /// Context bound to the ciphertext (base64); not in `kes`.
        #[arg(long)]
        context: Option<String>,
    },
    /// Decrypt a base64 ciphertext; prints the plaintext in base64.
    Decrypt {
        #[command(flatten)]
        opts: ClientOpts,
        name: String,
        ciphertext: String,
        /// The context it was encrypted with (base64).
        context: Option<String>,
    },
    /// Make a new version of a key: it seals from now on, older versions keep decrypting
    /// (kesh only; not in `kes`).
    Rotate {
        #[command(flatten)]
        opts: ClientOpts,
        name: String,
    },
    /// List a key's versions: creation time, state, and the server's use of each since it
    /// started (kesh only).
    Versions {
        #[command(flatten)]
        opts: ClientOpts,
        name: String,
    },
    /// Destroy an old key version: ciphertexts of that version no longer decrypt. Refused for
    /// the sealing version and version 1 (kesh only).
    DestroyVersion {
        #[command(flatten)]
        opts: ClientOpts,
        name: String,
        version: u32,
    },
}

#[derive(Subcommand, Debug)]
pub(crate) enum PolicyCommand {
    /// Describe a policy (name, creation).
    Info {
        #[command(flatten)]
        opts: ClientOpts,
        name: String,
    },
    /// List policies matching a pattern (`*` or a prefix ending in `*`).
    Ls {
        #[command(flatten)]
        opts: ClientOpts,
        #[arg(default_value = "*")]
        pattern: String,
    },
    /// Show a policy's allow and deny rules.
    Show {
        #[command(flatten)]
        opts: ClientOpts,
        name: String,
    },
}

#[derive(Args, Debug)]
#[command(args_conflicts_with_subcommands = true)]
pub(crate) struct IdentityArgs {
    #[command(subcommand)]
    pub command: Option<IdentityCommand>,
    /// An API key or a PEM file: prints its identity (no argument: a new API key).
    #[arg(value_name = "API-KEY|FILE")]
    pub of: Option<String>,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Subcommand, Debug)]
pub(crate) enum IdentityCommand {
    /// A new API key, or an Ed25519 key and certificate written to --key/--cert.
    New(identity::NewArgs),
    /// The identity of an API key, a certificate or an Ed25519 private key file.
    Of {
        /// `kes:v1:...`, or a PEM certificate or Ed25519 private key file.
        #[arg(value_name = "API-KEY|FILE")]
        input: String,
        #[arg(long)]
        json: bool,
    },
    /// Describe an identity (default: the caller's own).
    Info {
        #[command(flatten)]
        opts: ClientOpts,
        identity: Option<String>,
    },
    /// List identities matching a pattern.
    Ls {
        #[command(flatten)]
        opts: ClientOpts,
        #[arg(default_value = "*")]
        pattern: String,
    },
}

#[derive(Args, Debug)]
pub(crate) struct LsArgs {
    #[command(flatten)]
    pub opts: ClientOpts,
    /// API key to use instead of KES_API_KEY (visible to other local users in `ps`).
    #[arg(short = 'a', long = "api-key", value_name = "KEY")]
    pub api_key: Option<String>,
    /// List identities.
    #[arg(short = 'i', long = "identity", conflicts_with = "policy")]
    pub identity: bool,
    /// List policies.
    #[arg(short = 'p', long = "policy")]
    pub policy: bool,
    /// Prefix (`*` or nothing for all).
    #[arg(default_value = "*")]
    pub prefix: String,
}

#[derive(Args, Debug)]
pub(crate) struct StatusArgs {
    #[command(flatten)]
    pub opts: ClientOpts,
    /// Also list the server's API routes.
    #[arg(long)]
    pub api: bool,
    /// One line: the endpoint and whether it is up.
    #[arg(long = "short", conflicts_with = "api")]
    pub short: bool,
}

#[derive(Args, Debug)]
pub(crate) struct MetricArgs {
    #[command(flatten)]
    pub opts: ClientOpts,
    /// Poll every interval (Go duration: 5s, 500ms) and print one snapshot each time.
    #[arg(long, value_name = "DURATION")]
    pub rate: Option<String>,
    /// Stop after this many snapshots (default: 1 without --rate, unlimited with it).
    #[arg(long)]
    pub count: Option<u64>,
}

#[derive(Args, Debug)]
pub(crate) struct LogArgs {
    #[command(flatten)]
    pub opts: ClientOpts,
    /// The audit log (default).
    #[arg(long, conflicts_with = "error")]
    pub audit: bool,
    /// The error log.
    #[arg(long)]
    pub error: bool,
    /// Stop after this many events (default: run until interrupted).
    #[arg(long)]
    pub count: Option<u64>,
}

#[derive(Subcommand, Debug)]
pub(crate) enum HsmCommand {
    /// Test which kesh schemes a token supports and print a keystore config for it.
    Probe(hsm::ProbeArgs),
}

/// A failure that ends the process: the message (with what to do) goes to stderr.
pub(crate) struct Fatal(pub String);

impl<E: std::fmt::Display> From<E> for Fatal {
    fn from(e: E) -> Self {
        Fatal(e.to_string())
    }
}

pub(crate) fn main() -> ExitCode {
    let cli = Cli::parse();
    let server = matches!(cli.command, Command::Server(_));
    // Client commands keep stdout for results and stderr quiet unless asked (RUST_LOG).
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        // Colour codes only for a person at a terminal, never into log files or journald.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| {
                tracing_subscriber::EnvFilter::new(if server { "info" } else { "warn" })
            }),
        )
        .init();
    let result = match cli.command {
        Command::Completion { shell } => {
            clap_complete::generate(shell, &mut Cli::command(), "kesh", &mut std::io::stdout());
            Ok(())
        }
        Command::Hsm(HsmCommand::Probe(args)) => hsm::probe(args),
        Command::Identity(IdentityArgs {
            command: None,
            of,
            json,
        }) => identity::bare(of.as_deref(), json),
        Command::Identity(IdentityArgs {
            command: Some(IdentityCommand::New(args)),
            ..
        }) => identity::new(args),
        Command::Identity(IdentityArgs {
            command: Some(IdentityCommand::Of { input, json }),
            ..
        }) => identity::of(&input, json),
        command => run_async(command),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(Fatal(msg)) => {
            eprintln!("Error: {msg}");
            ExitCode::FAILURE
        }
    }
}

fn run_async(command: Command) -> Result<(), Fatal> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| Fatal(format!("cannot start the async runtime: {e}")))?;
    runtime.block_on(async move {
        match command {
            Command::Server(args) => server::run(args).await,
            Command::Key(cmd) => commands::key(cmd).await,
            Command::Policy(cmd) => commands::policy(cmd).await,
            Command::Identity(IdentityArgs {
                command: Some(IdentityCommand::Info { opts, identity }),
                ..
            }) => commands::identity_info(opts, identity).await,
            Command::Identity(IdentityArgs {
                command: Some(IdentityCommand::Ls { opts, pattern }),
                ..
            }) => commands::identity_ls(opts, &pattern).await,
            Command::Ls(args) => commands::ls(args).await,
            Command::Status(args) => commands::status(args).await,
            Command::Metric(args) => commands::metric(args).await,
            Command::Log(args) => commands::log(args).await,
            Command::Migrate(args) => migrate::run(args).await,
            Command::Bench(args) => bench::run(args).await,
            Command::Identity(_) | Command::Hsm(_) | Command::Completion { .. } => {
                Err(Fatal("internal: command dispatched twice".into()))
            }
        }
    })
}
