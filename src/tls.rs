//! TLS pieces both sides use: the one rustls crypto provider (`ring`) and PEM loading of
//! certificates, keys and roots. The server's and the clients' configurations are built by
//! their own modules ([`crate::server::tls`], [`crate::client`], [`crate::migrate`]); this module
//! holds no policy about what a peer must present.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::RootCertStore;

/// Errors building the TLS configuration.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A PEM file could not be read or parsed.
    #[error("tls: cannot read '{path}': {message}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        message: String,
    },
    /// A certificate file holds no certificate.
    #[error("tls: '{0}' contains no certificate")]
    NoCertificate(PathBuf),
    /// A server certificate names no DNS name or IP address.
    #[error("tls: certificate '{0}' does not contain any DNS or IP address as SAN; clients verify the server's name against it")]
    NoSubjectAltName(PathBuf),
    /// rustls refused the certificate, key or settings.
    #[error("tls: invalid TLS configuration: {0}")]
    Rustls(String),
    /// A self-signed certificate (`--dev`, `kesh identity new`) could not be made.
    #[error("tls: cannot generate certificate: {0}")]
    Generate(String),
}

/// The crypto provider every kesh TLS config uses.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Reads every CERTIFICATE block of a PEM file.
pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let read_err = |e: rustls::pki_types::pem::Error| TlsError::Read {
        path: path.to_owned(),
        message: e.to_string(),
    };
    let certs: Vec<_> = CertificateDer::pem_file_iter(path)
        .map_err(read_err)?
        .collect::<Result<_, _>>()
        .map_err(read_err)?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate(path.to_owned()));
    }
    Ok(certs)
}

/// Reads the first private key (PKCS#8, PKCS#1 or SEC1) of a PEM file.
pub fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| TlsError::Read {
        path: path.to_owned(),
        message: e.to_string(),
    })
}

/// Roots from a PEM file or from every file in a directory (`tls.ca`).
pub fn load_roots(path: &Path) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    let files: Vec<PathBuf> = if path.is_dir() {
        let entries = std::fs::read_dir(path).map_err(|e| TlsError::Read {
            path: path.to_owned(),
            message: e.to_string(),
        })?;
        entries
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.is_file())
            .collect()
    } else {
        vec![path.to_owned()]
    };
    for file in files {
        for cert in load_certs(&file)? {
            roots
                .add(cert)
                .map_err(|e| TlsError::Rustls(format!("{}: {e}", file.display())))?;
        }
    }
    Ok(roots)
}
