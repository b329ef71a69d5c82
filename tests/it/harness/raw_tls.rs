//! TLS connections below the client library, for tests of the handshake itself: which
//! certificates the server asks for and accepts, TLS 1.2, kept-alive connections.

use std::net::SocketAddr;
use std::sync::Arc;

use kesh::identity::ApiKey;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::ClientConfig;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

/// A client configuration trusting `ca`: TLS 1.2 only or rustls's defaults, and with the
/// certificate of `key` when given (else no client certificate).
pub fn client_config(
    ca: &CertificateDer<'static>,
    tls12_only: bool,
    key: Option<&ApiKey>,
) -> ClientConfig {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca.clone()).unwrap();
    let builder =
        ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()));
    let builder = if tls12_only {
        builder.with_protocol_versions(&[&rustls::version::TLS12])
    } else {
        builder.with_safe_default_protocol_versions()
    }
    .unwrap()
    .with_root_certificates(roots);
    match key {
        None => builder.with_no_client_auth(),
        Some(key) => {
            let (cert, pkcs8) = key.certificate().unwrap();
            builder
                .with_client_auth_cert(
                    vec![CertificateDer::from(cert)],
                    PrivateKeyDer::try_from(pkcs8.to_vec()).unwrap(),
                )
                .unwrap()
        }
    }
}

/// A TLS connection to `addr`, verifying the server as 127.0.0.1.
pub async fn connect(
    addr: SocketAddr,
    config: Arc<ClientConfig>,
) -> std::io::Result<TlsStream<TcpStream>> {
    let tcp = TcpStream::connect(addr).await?;
    let name = ServerName::try_from("127.0.0.1").unwrap();
    tokio_rustls::TlsConnector::from(config)
        .connect(name, tcp)
        .await
}

/// `GET path` over HTTP/1.1 on a new connection; the whole response as it came.
pub async fn get(
    addr: SocketAddr,
    config: Arc<ClientConfig>,
    path: &str,
) -> std::io::Result<Vec<u8>> {
    let mut tls = connect(addr, config).await?;
    let req = format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    tls.write_all(req.as_bytes()).await?;
    let mut buf = Vec::new();
    tls.read_to_end(&mut buf).await?;
    Ok(buf)
}
