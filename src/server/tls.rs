//! TLS for the server: TLS 1.2 and 1.3, ALPN `h2` and `http/1.1`, mandatory client
//! certificates (docs/api.md, "Transport"; KES: `kesconf/file.go`, `server.go`). PEM loading and the crypto provider are in [`crate::tls`].
//!
//! By default any end-entity client certificate is accepted without chain or validity checks —
//! MinIO's API keys arrive as self-signed Ed25519 certificates — while the handshake signature
//! (proof of possession) is still verified. With `tls.auth: on` the chain must verify against
//! `tls.ca`.

use std::sync::Arc;

use crate::tls::{provider, TlsError};

use rustls::client::danger::HandshakeSignatureValid;
use rustls::crypto::WebPkiSupportedAlgorithms;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::WebPkiClientVerifier;
use rustls::{
    DigitallySignedStruct, DistinguishedName, RootCertStore, ServerConfig, SignatureScheme,
};

/// How client certificates are checked.
#[derive(Debug, Clone)]
pub enum ClientAuth {
    /// Any end-entity certificate; only the handshake signature is verified (`tls.auth: off`).
    AnyCertificate,
    /// The chain must verify against these roots (`tls.auth: on`).
    VerifyChain(Arc<RootCertStore>),
}

/// Builds the server config. `mandatory` is false only when some route has `skip_auth`.
pub fn server_config(
    certs: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    auth: &ClientAuth,
    mandatory: bool,
) -> Result<Arc<ServerConfig>, TlsError> {
    let provider = provider();
    let verifier: Arc<dyn ClientCertVerifier> = match auth {
        ClientAuth::AnyCertificate => Arc::new(AnyClientCertificate {
            algorithms: provider.signature_verification_algorithms,
            mandatory,
        }),
        ClientAuth::VerifyChain(roots) => {
            let builder =
                WebPkiClientVerifier::builder_with_provider(roots.clone(), provider.clone());
            let builder = if mandatory {
                builder
            } else {
                builder.allow_unauthenticated()
            };
            builder
                .build()
                .map_err(|e| TlsError::Rustls(e.to_string()))?
        }
    };
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| TlsError::Rustls(e.to_string()))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(certs, key)
        .map_err(|e| TlsError::Rustls(e.to_string()))?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// Accepts any end-entity certificate (KES's `RequireAnyClientCert`) but verifies the
/// handshake signature with the certificate's key, so the client must hold the private key.
#[derive(Debug)]
struct AnyClientCertificate {
    algorithms: WebPkiSupportedAlgorithms,
    mandatory: bool,
}

impl ClientCertVerifier for AnyClientCertificate {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        self.mandatory
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        // No chain or validity checks by design; the certificate must still be parseable far
        // enough to name its key, since that key is the client's identity.
        crate::identity::spki_of_certificate(end_entity).map_err(|_| {
            rustls::Error::InvalidCertificate(rustls::CertificateError::BadEncoding)
        })?;
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// A self-signed ECDSA P-256 server certificate for `--dev`: CN localhost, SANs `localhost`,
/// the loopback addresses and `extra_ips`, 90 days, EKU serverAuth.
pub fn dev_certificate(
    extra_ips: &[std::net::IpAddr],
) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), TlsError> {
    let gen = |e: rcgen::Error| TlsError::Generate(e.to_string());
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(gen)?;
    let mut sans = vec![
        "localhost".to_owned(),
        "127.0.0.1".to_owned(),
        "::1".to_owned(),
    ];
    for ip in extra_ips {
        if !ip.is_unspecified() && !sans.contains(&ip.to_string()) {
            sans.push(ip.to_string());
        }
    }
    let mut params = rcgen::CertificateParams::new(sans).map_err(gen)?;
    params.distinguished_name = rcgen::DistinguishedName::new();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "localhost");
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now - time::Duration::minutes(1);
    params.not_after = now + time::Duration::days(90);
    params.key_usages = vec![rcgen::KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
    let cert = params.self_signed(&key).map_err(gen)?;
    let key_der = PrivateKeyDer::try_from(key.serialize_der())
        .map_err(|e| TlsError::Generate(e.to_string()))?;
    Ok((vec![cert.der().clone()], key_der))
}
