//! `kesh identity` without a server: new API keys, Ed25519 key/certificate pairs, and the
//! identity of a key or certificate (docs/cli.md, "Identities").
//!
//! The API key printed here is a credential: it goes to stdout once, for the operator, and
//! nowhere else.

use std::io::Write;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use base64::Engine;
use serde_json::json;

use kesh::identity::{ApiKey, Identity};
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use super::output::{self, fields};
use super::Fatal;

#[derive(clap::Args, Debug)]
pub(crate) struct NewArgs {
    /// Write the private key (PKCS#8 PEM, mode 0600) here; needs --cert.
    #[arg(long, requires = "cert", value_name = "FILE")]
    pub key: Option<PathBuf>,
    /// Write the self-signed certificate (PEM) here; needs --key.
    #[arg(long, requires = "key", value_name = "FILE")]
    pub cert: Option<PathBuf>,
    /// An IP address for the certificate's SANs (server certificates); repeatable.
    #[arg(long = "ip", requires = "cert")]
    pub ips: Vec<IpAddr>,
    /// A DNS name for the certificate's SANs (server certificates); repeatable.
    #[arg(long = "dns", requires = "cert")]
    pub dns: Vec<String>,
    /// How long the certificate is valid (Go duration, e.g. 720h).
    #[arg(long, default_value = "720h", requires = "cert")]
    pub expiry: String,
    /// Overwrite existing files.
    #[arg(short = 'f', long)]
    pub force: bool,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
    /// The certificate's subject common name (default: the identity).
    pub subject: Option<String>,
}

/// `kesh identity [<api-key|file>]`.
pub(super) fn bare(of_input: Option<&str>, json: bool) -> Result<(), Fatal> {
    match of_input {
        Some(input) => of(input, json),
        None => print_api_key(&ApiKey::generate()?, json),
    }
}

fn print_api_key(key: &ApiKey, json_out: bool) -> Result<(), Fatal> {
    let text = key.expose_text();
    if json_out {
        output::json(&json!({ "api_key": text.as_str(), "identity": key.identity().as_str() }))
    } else {
        fields(&[
            ("API Key", text.to_string()),
            ("Identity", key.identity().to_string()),
        ])
    }
}

/// `kesh identity new`.
pub(super) fn new(args: NewArgs) -> Result<(), Fatal> {
    let key = ApiKey::generate()?;
    let (Some(key_path), Some(cert_path)) = (&args.key, &args.cert) else {
        if args.subject.is_some() {
            return Err(Fatal(
                "a subject needs --key FILE and --cert FILE to write the certificate to".into(),
            ));
        }
        return print_api_key(&key, args.json);
    };
    let expiry = kesh::config::parse_duration(&args.expiry)
        .filter(|d| !d.is_zero())
        .ok_or_else(|| {
            Fatal(format!(
                "--expiry '{}' is not a duration: write e.g. 720h or 8760h",
                args.expiry
            ))
        })?;
    for p in [key_path, cert_path] {
        if p.exists() && !args.force {
            return Err(Fatal(format!(
                "'{}' already exists: remove it or pass -f/--force to overwrite",
                p.display()
            )));
        }
    }
    let identity = key.identity();
    let pkcs8 = key.pkcs8_der();
    let der = rustls::pki_types::PrivatePkcs8KeyDer::from(pkcs8.as_slice());
    let pair = rcgen::KeyPair::from_pkcs8_der_and_sign_algo(&der, &rcgen::PKCS_ED25519)?;
    let mut sans: Vec<String> = args.dns.clone();
    sans.extend(args.ips.iter().map(IpAddr::to_string));
    let mut params = rcgen::CertificateParams::new(sans)?;
    params.distinguished_name = rcgen::DistinguishedName::new();
    let subject = args.subject.clone().unwrap_or_else(|| identity.to_string());
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, subject);
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now - time::Duration::minutes(1);
    params.not_after =
        now + time::Duration::try_from(expiry).map_err(|_| Fatal("--expiry is too long".into()))?;
    params.key_usages = vec![rcgen::KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![
        rcgen::ExtendedKeyUsagePurpose::ServerAuth,
        rcgen::ExtendedKeyUsagePurpose::ClientAuth,
    ];
    params.is_ca = rcgen::IsCa::ExplicitNoCa;
    let cert = params.self_signed(&pair)?;
    write_file(key_path, pair.serialize_pem().as_bytes(), 0o600)?;
    write_file(cert_path, cert.pem().as_bytes(), 0o644)?;
    if args.json {
        output::json(&json!({
            "identity": identity.as_str(),
            "key": key_path.display().to_string(),
            "cert": cert_path.display().to_string(),
        }))
    } else {
        fields(&[
            ("Private key", key_path.display().to_string()),
            ("Certificate", cert_path.display().to_string()),
            ("Identity", identity.to_string()),
        ])
    }
}

/// Writes a file with `mode`, replacing any old one.
fn write_file(path: &Path, data: &[u8], mode: u32) -> Result<(), Fatal> {
    use std::os::unix::fs::OpenOptionsExt;
    let _ = std::fs::remove_file(path);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(|e| Fatal(format!("cannot write '{}': {e}", path.display())))?;
    f.write_all(data)
        .and_then(|()| f.sync_all())
        .map_err(|e| Fatal(format!("cannot write '{}': {e}", path.display())))
}

/// The DER prefix of an Ed25519 PKCS#8 v1 private key; the 32-byte seed follows.
const ED25519_PKCS8_PREFIX: [u8; 16] = [
    0x30, 0x2e, 0x02, 0x01, 0x00, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22, 0x04, 0x20,
];

/// `kesh identity of <api-key|cert-file|key-file>`.
pub(super) fn of(input: &str, json_out: bool) -> Result<(), Fatal> {
    let path = Path::new(input);
    if !path.exists() {
        let key = ApiKey::parse(input.trim()).map_err(|e| {
            Fatal(format!(
                "'{input}' is neither a file nor an API key ({e}); give kes:v1:... or a PEM certificate or key file"
            ))
        })?;
        let id = key.identity();
        return if json_out {
            output::json(&json!({ "identity": id.as_str() }))
        } else {
            output::line(id.as_str())
        };
    }
    let pem = zeroize::Zeroizing::new(
        std::fs::read(path).map_err(|e| Fatal(format!("cannot read '{input}': {e}")))?,
    );
    if let Some(Ok(cert)) = CertificateDer::pem_slice_iter(&pem).next() {
        let id = Identity::from_certificate(&cert)
            .map_err(|_| Fatal(format!("'{input}' holds a certificate kesh cannot parse")))?;
        return if json_out {
            output::json(&json!({ "identity": id.as_str() }))
        } else {
            output::line(id.as_str())
        };
    }
    let key = super::client::private_key(&pem, "file", input)?;
    match key {
        PrivateKeyDer::Pkcs8(k)
            if k.secret_pkcs8_der().len() == 48
                && k.secret_pkcs8_der().starts_with(&ED25519_PKCS8_PREFIX) =>
        {
            let mut raw = zeroize::Zeroizing::new(vec![0u8]);
            raw.extend_from_slice(&k.secret_pkcs8_der()[16..]);
            let text = zeroize::Zeroizing::new(format!(
                "kes:v1:{}",
                base64::engine::general_purpose::STANDARD.encode(raw.as_slice())
            ));
            let api_key = ApiKey::parse(&text)?;
            print_api_key(&api_key, json_out)
        }
        _ => Err(Fatal(format!(
            "'{input}' is a private key but not Ed25519: its identity comes from its certificate; run `kesh identity of <cert.pem>`"
        ))),
    }
}
