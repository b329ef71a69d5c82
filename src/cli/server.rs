//! `kesh server`: run the server from a config file, or `--dev` with throwaway keys.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use time::OffsetDateTime;

use kesh::config::server::{parse_address, ServerConfig, DEFAULT_ADDRESS};
use kesh::identity::ApiKey;
use kesh::keystore::KeyStore;
use kesh::server::audit::{AuditLog, ErrorLog};
use kesh::server::metrics::Metrics;
use kesh::server::policy::Authorizer;
use kesh::server::routes::RouteSettings;
use kesh::server::service::Service;
use kesh::server::{self, Server, ServerHandle, ServerParts};

use super::Fatal;

#[derive(clap::Args, Debug)]
pub(super) struct ServerArgs {
    /// Config file (KES YAML with a `pkcs11:` or `soft:` keystore).
    #[arg(long, conflicts_with = "dev", required_unless_present = "dev")]
    config: Option<PathBuf>,
    /// Listen address `<ip>:<port>`; overrides the config's `address`.
    #[arg(long)]
    addr: Option<String>,
    /// Development mode: no config, self-signed certificate, fresh admin API key, throwaway keys.
    #[arg(long)]
    dev: bool,
}

fn address(flag: Option<&str>, config: Option<SocketAddr>) -> Result<SocketAddr, Fatal> {
    match flag {
        Some(a) => parse_address(a)
            .ok_or_else(|| Fatal(format!("--addr: '{a}' is not an <ip>:<port> address"))),
        None => match config {
            Some(a) => Ok(a),
            None => parse_address(DEFAULT_ADDRESS)
                .ok_or_else(|| Fatal("invalid default address".into())),
        },
    }
}

pub(super) async fn run(args: ServerArgs) -> Result<(), Fatal> {
    let hardening = kesh::server::hardening::harden();
    for warning in &hardening.warnings {
        tracing::warn!("{warning}");
    }
    tracing::info!(
        memory_locked = hardening.memory_locked,
        core_dumps_disabled = hardening.core_dumps_disabled,
        "process hardening"
    );
    if args.dev {
        return run_dev(args.addr.as_deref()).await;
    }
    let Some(path) = args.config else {
        return Err(Fatal(
            "--config <FILE> is required unless --dev is given".into(),
        ));
    };
    let cfg = ServerConfig::load(&path)?;
    let addr = address(args.addr.as_deref(), cfg.address)?;
    let keystore = cfg
        .keystore
        .open()
        .await
        .map_err(|e| Fatal(format!("keystore: {e}")))?;
    let metrics = Arc::new(Metrics::new());
    let service = Arc::new(Service::new(
        keystore,
        cfg.authorizer(OffsetDateTime::now_utc())?,
        metrics.clone(),
    ));
    server::create_keys(&service, &cfg.keys)
        .await
        .map_err(|e| Fatal(format!("keys: {e}")))?;
    service.set_rotation_schedule(cfg.rotate_after.clone());
    let parts = ServerParts {
        service: service.clone(),
        tls: server::tls_from_config(&cfg)?,
        routes: RouteSettings::new(&cfg.api),
        audit: AuditLog::new(metrics.clone(), cfg.log.audit),
        errors: ErrorLog::new(metrics, cfg.log.error),
    };
    let server = Server::bind(addr, parts)
        .await
        .map_err(|e| Fatal(format!("cannot listen on {addr}: {e}")))?;
    let local = server.local_addr()?;
    let admin = cfg.admin.clone();
    banner(
        &service,
        local,
        if admin.is_hash() {
            admin.as_str()
        } else {
            "<disabled>"
        },
        None,
        cfg.log.audit,
    );
    let handle = server.handle();
    spawn_signals(handle, Some(path));
    server.run().await?;
    Ok(())
}

async fn run_dev(addr: Option<&str>) -> Result<(), Fatal> {
    let addr = match addr {
        Some(a) => parse_address(a)
            .ok_or_else(|| Fatal(format!("--addr: '{a}' is not an <ip>:<port> address")))?,
        None => parse_address("127.0.0.1:7373")
            .ok_or_else(|| Fatal("invalid default address".into()))?,
    };
    let api_key = ApiKey::generate()?;
    let admin = api_key.identity();
    // The token lives as long as the server: dropping it would delete the keys under it.
    let (keystore, _token): (
        Arc<dyn KeyStore>,
        Option<kesh::keystore::pkcs11::ephemeral::EphemeralToken>,
    ) = if kesh::keystore::pkcs11::ephemeral::module_path().is_some() {
        kesh::keystore::pkcs11::ephemeral::use_private_token_dir();
        let token = kesh::keystore::pkcs11::ephemeral::EphemeralToken::create()?;
        let ks = kesh::keystore::pkcs11::Pkcs11KeyStore::open(token.config()).await?;
        (Arc::new(ks), Some(token))
    } else {
        (
            Arc::new(kesh::keystore::soft::SoftKeyStore::in_memory()),
            None,
        )
    };
    let metrics = Arc::new(Metrics::new());
    let authorizer = Authorizer::new(admin.clone(), Default::default(), OffsetDateTime::now_utc())?;
    let service = Arc::new(Service::new(keystore, authorizer, metrics.clone()));
    let (certs, key) = server::tls::dev_certificate(&[addr.ip()])?;
    let tls =
        server::tls::server_config(certs, key, &server::tls::ClientAuth::AnyCertificate, true)?;
    let parts = ServerParts {
        service: service.clone(),
        tls,
        routes: RouteSettings::default(),
        audit: AuditLog::new(metrics.clone(), true),
        errors: ErrorLog::new(metrics, true),
    };
    let server = Server::bind(addr, parts)
        .await
        .map_err(|e| Fatal(format!("cannot listen on {addr}: {e}")))?;
    let local = server.local_addr()?;
    banner(&service, local, admin.as_str(), Some(&api_key), true);
    spawn_signals(server.handle(), None);
    server.run().await?;
    kesh::keystore::pkcs11::ephemeral::cleanup();
    Ok(())
}

/// The start-up banner, in KES's layout.
fn banner(
    service: &Service,
    addr: SocketAddr,
    admin: &str,
    api_key: Option<&ApiKey>,
    audit_to_stdout: bool,
) {
    let mut out = String::new();
    out.push_str(&format!("Version     {}\n", env!("CARGO_PKG_VERSION")));
    out.push_str(&format!(
        "Runtime     {} {}\n",
        std::env::consts::OS,
        std::env::consts::ARCH
    ));
    out.push_str(&format!("Keystore    {}\n", service.keystore_description()));
    out.push_str(&format!("API         · https://{addr}\n\n"));
    if let Some(key) = api_key {
        out.push_str(&format!("API Key     {}\n", key.expose_text().as_str()));
    }
    out.push_str(&format!("Admin       {admin}\n"));
    out.push_str(&format!(
        "Logs        error=stderr audit={}\n\n=> Server is up and running...\n",
        if audit_to_stdout { "stdout" } else { "off" }
    ));
    print!("{out}");
}

/// How often the TLS files are re-read, as KES does, so renewed certificates go live.
const TLS_REFRESH: std::time::Duration = std::time::Duration::from_secs(15 * 60);

/// SIGHUP reloads the config file (policies, admin, TLS, keys); SIGINT/SIGTERM shut down.
/// With a config file, the TLS certificate and key are also re-read every 15 minutes.
fn spawn_signals(handle: ServerHandle, config: Option<PathBuf>) {
    use tokio::signal::unix::{signal, SignalKind};
    if let Some(path) = config.clone() {
        let handle = handle.clone();
        tokio::spawn(async move {
            let mut tick =
                tokio::time::interval_at(tokio::time::Instant::now() + TLS_REFRESH, TLS_REFRESH);
            loop {
                tick.tick().await;
                let refreshed = ServerConfig::load(&path)
                    .map_err(|e| e.to_string())
                    .and_then(|cfg| server::tls_from_config(&cfg).map_err(|e| e.to_string()));
                match refreshed {
                    Ok(tls) => handle.set_tls(tls),
                    Err(e) => {
                        tracing::warn!(error = %e, "periodic TLS refresh failed; keeping the current certificate")
                    }
                }
            }
        });
    }
    tokio::spawn(async move {
        let (Ok(mut hup), Ok(mut term), Ok(mut int)) = (
            signal(SignalKind::hangup()),
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        ) else {
            tracing::error!("cannot install signal handlers; stop the server with SIGKILL");
            return;
        };
        loop {
            tokio::select! {
                _ = hup.recv() => match &config {
                    Some(path) => match ServerConfig::load(path) {
                        Ok(cfg) => match handle.reload(&cfg).await {
                            Ok(()) => tracing::info!(config = %path.display(), "configuration reloaded"),
                            Err(e) => tracing::error!(error = %e, "reload failed; keeping the running configuration"),
                        },
                        Err(e) => tracing::error!(error = %e, "reload failed; keeping the running configuration"),
                    },
                    None => tracing::info!("SIGHUP ignored in --dev mode (no config file)"),
                },
                _ = term.recv() => break,
                _ = int.recv() => break,
            }
        }
        tracing::info!("shutting down");
        handle.shutdown();
    });
}
