//! Finding the server and the credentials, as `kes` does (docs/cli.md, "Finding the
//! server and credentials"), and turning
//! client errors into messages that say what to do.

use std::future::Future;
use std::path::Path;

use kesh::client::{errors, Client, ClientError, Credentials, ServerTrust};
use kesh::identity::ApiKey;
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use super::{ClientOpts, Fatal};

pub(super) const DEFAULT_SERVER: &str = "127.0.0.1:7373";

/// The first non-empty variable of `names`, and its name.
fn env_first(names: &[&'static str]) -> Option<(&'static str, String)> {
    names.iter().find_map(|n| {
        std::env::var(n)
            .ok()
            .filter(|v| !v.trim().is_empty())
            .map(|v| (*n, v))
    })
}

const SERVER_VARS: &[&str] = &["MINIO_KES_SERVER", "KES_SERVER", "MINIO_KMS_KES_ENDPOINT"];
const API_KEY_VARS: &[&str] = &["MINIO_KES_API_KEY", "KES_API_KEY", "MINIO_KMS_KES_API_KEY"];
const KEY_FILE_VARS: &[&str] = &[
    "MINIO_KES_KEY_FILE",
    "KES_CLIENT_KEY",
    "MINIO_KES_CLIENT_KEY",
];
const CERT_FILE_VARS: &[&str] = &[
    "MINIO_KES_CERT_FILE",
    "KES_CLIENT_CERT",
    "MINIO_KES_CLIENT_CERT",
];

/// The endpoints to try, in order: `--server`, else the environment, else the default.
pub(super) fn endpoints(flag: Option<&str>) -> Vec<String> {
    let text = match flag {
        Some(s) => s.to_owned(),
        None => env_first(SERVER_VARS)
            .map(|(_, v)| v)
            .unwrap_or_else(|| DEFAULT_SERVER.to_owned()),
    };
    text.split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
        .collect()
}

fn read(path: &str, what: &str, var: &str) -> Result<Vec<u8>, Fatal> {
    std::fs::read(path)
        .map_err(|e| Fatal(format!("cannot read the {what} '{path}' (from {var}): {e}")))
}

/// The client's credentials: `api_key` (the `-a` flag), else an API key from the environment,
/// else a certificate and key file pair.
pub(super) fn credentials(api_key: Option<&str>) -> Result<Credentials, Fatal> {
    let key_var = api_key
        .map(|k| ("--api-key", k.to_owned()))
        .or_else(|| env_first(API_KEY_VARS));
    let cert = env_first(CERT_FILE_VARS);
    let key = env_first(KEY_FILE_VARS);
    match (key_var, cert, key) {
        (Some((var, _)), Some(_), _) | (Some((var, _)), _, Some(_)) => Err(Fatal(format!(
            "{var} is set together with a client certificate or key file: use either an API key or KES_CLIENT_CERT and KES_CLIENT_KEY, not both"
        ))),
        (Some((var, text)), None, None) => {
            let text = zeroize::Zeroizing::new(text);
            ApiKey::parse(text.trim())
                .map(Credentials::ApiKey)
                .map_err(|e| Fatal(format!("{var}: {e}; an API key looks like kes:v1:... (make one with `kesh identity new`)")))
        }
        (None, Some((cvar, cert)), Some((kvar, key))) => {
            let chain_pem = read(&cert, "client certificate", cvar)?;
            let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&chain_pem)
                .collect::<Result<_, _>>()
                .map_err(|e| Fatal(format!("{cvar}: '{cert}' is not a PEM certificate: {e}")))?;
            if chain.is_empty() {
                return Err(Fatal(format!("{cvar}: '{cert}' holds no certificate")));
            }
            let key_pem = zeroize::Zeroizing::new(read(&key, "client key", kvar)?);
            Ok(Credentials::Certificate {
                chain,
                key: private_key(&key_pem, kvar, &key)?,
            })
        }
        (None, Some((var, _)), None) => Err(Fatal(format!(
            "{var} is set but no client key: set KES_CLIENT_KEY to the certificate's private key file"
        ))),
        (None, None, Some((var, _))) => Err(Fatal(format!(
            "{var} is set but no client certificate: set KES_CLIENT_CERT to the certificate file"
        ))),
        (None, None, None) => Err(Fatal(
            "no credentials: set KES_API_KEY to an API key (kes:v1:...), or KES_CLIENT_CERT and KES_CLIENT_KEY to a certificate and its key".into(),
        )),
    }
}

/// A PEM private key; encrypted keys are refused with the way out.
pub(super) fn private_key(
    pem: &[u8],
    var: &str,
    path: &str,
) -> Result<PrivateKeyDer<'static>, Fatal> {
    if pem.windows(b"ENCRYPTED".len()).any(|w| w == b"ENCRYPTED") {
        return Err(Fatal(format!(
            "{var}: '{path}' is an encrypted private key, which kesh cannot read; decrypt it with `openssl pkey -in {path} -out plain.pem` and keep that file private"
        )));
    }
    PrivateKeyDer::from_pem_slice(pem)
        .map_err(|_| Fatal(format!("{var}: '{path}' holds no PEM private key")))
}

/// How the server certificate is checked: `-k`, `--ca`, `SSL_CERT_FILE`, or the system roots.
pub(super) fn trust(opts: &ClientOpts) -> Result<ServerTrust, Fatal> {
    if opts.insecure {
        return Ok(ServerTrust::DangerInsecure);
    }
    let file = match &opts.ca {
        Some(p) => Some(p.clone()),
        None => std::env::var_os("SSL_CERT_FILE")
            .map(Into::into)
            .or_else(|| {
                [
                    "/etc/ssl/certs/ca-certificates.crt",
                    "/etc/pki/tls/certs/ca-bundle.crt",
                    "/etc/ssl/cert.pem",
                ]
                .iter()
                .map(Path::new)
                .find(|p| p.exists())
                .map(Path::to_owned)
            }),
    };
    let Some(file) = file else {
        return Err(Fatal(
            "no CA certificates found to verify the server: give --ca FILE, set SSL_CERT_FILE, or use -k/--insecure for a self-signed server".into(),
        ));
    };
    let pem = std::fs::read(&file)
        .map_err(|e| Fatal(format!("cannot read CA file '{}': {e}", file.display())))?;
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&pem)
        .filter_map(Result::ok)
        .collect();
    if certs.is_empty() {
        return Err(Fatal(format!(
            "'{}' holds no PEM certificate",
            file.display()
        )));
    }
    Ok(ServerTrust::Roots(certs))
}

/// A connection to the configured server(s).
pub(super) struct Conn {
    clients: Vec<(String, Client)>,
}

impl Conn {
    pub(super) fn new(opts: &ClientOpts, api_key: Option<&str>) -> Result<Self, Fatal> {
        let mut clients = Vec::new();
        for endpoint in endpoints(opts.server.as_deref()) {
            // Credentials are consumed by the client; read them once per endpoint.
            let client =
                Client::new(&endpoint, credentials(api_key)?, trust(opts)?).map_err(|e| {
                    Fatal(format!(
                        "{e}: the server is given as host:port in KES_SERVER or --server"
                    ))
                })?;
            clients.push((endpoint, client));
        }
        if clients.is_empty() {
            return Err(Fatal("KES_SERVER is empty: set it to host:port".into()));
        }
        Ok(Conn { clients })
    }

    /// Runs `f` against the first endpoint that can be reached.
    pub(super) async fn call<T, F, Fut>(&self, f: F) -> Result<T, Fatal>
    where
        F: Fn(Client) -> Fut,
        Fut: Future<Output = Result<T, ClientError>>,
    {
        let mut last = None;
        for (endpoint, client) in &self.clients {
            match f(client.clone()).await {
                Err(ClientError::Connect(e)) => last = Some((endpoint, ClientError::Connect(e))),
                Ok(v) => return Ok(v),
                Err(e) => return Err(explain(endpoint, e)),
            }
        }
        match last {
            Some((endpoint, e)) => Err(explain(endpoint, e)),
            None => Err(Fatal("no server configured".into())),
        }
    }
}

/// The error with what to do about it.
pub(super) fn explain(endpoint: &str, e: ClientError) -> Fatal {
    let hint = match &e {
        ClientError::UntrustedServer(_) => {
            " (pass --ca FILE with the CA that issued it, or -k/--insecure for a self-signed development server)"
        }
        ClientError::Connect(_) => " (is the server running? check KES_SERVER or --server)",
        ClientError::Api(a) if *a == errors::NOT_ALLOWED => {
            " (this identity's policy does not allow the request: `kesh identity info` shows it)"
        }
        ClientError::Api(a) if a.status == 400 && a.message.contains("client certificate") => {
            " (set KES_API_KEY, or KES_CLIENT_CERT and KES_CLIENT_KEY)"
        }
        _ => "",
    };
    Fatal(format!("{endpoint}: {e}{hint}"))
}
