//! Every certificate and client identity the suites use, made at test time: a server's CA and
//! leaf (in memory, or written as files for a `kesh server` child), client certificates of each
//! algorithm, and CA-flagged self-signed certificates. Owns no server and no file layout
//! beyond the three files [`ServerCerts::write`] names.

use std::path::{Path, PathBuf};

use kesh::client::Credentials;
use kesh::identity::Identity;
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

/// A test-only RSA-2048 key (RSA key generation is not available through ring); the
/// certificate around it is made at test time.
const RSA_KEY: &str = "-----BEGIN PRIVATE KEY-----
MIIEvQIBADANBgkqhkiG9w0BAQEFAASCBKcwggSjAgEAAoIBAQCm4ZBFiSZEzj3F
iB3gEITcJ3egaO8s9TCcmk2FuC+iprxotOXaw4usQ+zyvtsSkYcAp4GXW1OlBZz2
fGv2K4R9EkY6b1wl+GUm+asN5xpsqfqMMlM6+D+/zXR9gn7d4W0EJ6FtghxBIFpt
P0j2UHMh/JwwvEQEy74UuPckU06yWylcXJaenPvXZdEXIg5cwXnRTrBiGMJoXkHz
P9g0543EZzW7E2jD2LmAh4JmjU23g5rTZu4ERfiBslwg3EaOQJW36Fefdy8DVbcD
iTdYLpIablr9xnlIf9AkdMeByOP92BvtAJkwhSYSQHTy5yUkoXAxMDCcUT1jHFFb
EkMw4t2jAgMBAAECggEASRabWEkUEKh/V2chJoQ1nDJQ61lp/ze3va666yja/BKo
i/dGgESKhL0PJtW+HujLxtaWJFMkVC8cKrwdkKhIk3qQdYFWS2755lMMvr8LzLG5
gPN9jmMxkHCMZ3fi1oyncV1mDw8gDsn7sMM50l8zvZvkUFf0NmGBc5P68dbmragY
XIr60DkWr/8hIk/FLTsxqV42iJwd6Yn0UfkVu60Cn2q1XYn0eXU6LpE/Iy+2GAFb
fBVshGaQFw0/kgh6k8pSMirbcCxpng5lL0csBT71sOryK9aRREEMgwRMoa6WpwYw
AawVoYhD4jLl+WtufmZWRdTR76jUpnivBPKzH6ZTaQKBgQDUUcEg+a30s9iwNVXm
vjtu2Rgn4qEvWuTEqXpulivX1ECakqOhewr9yRbigdX9f4P7us0UuHoLXDfqQcpX
x2CPdKbUGkz/DSs01eQAs5xvpLRsfxJxDobPvXYWt+etcK5ucFAnNuHJRjysDQuF
/rqcXCEdd1Y4yFu3SqelJ4DbxQKBgQDJNrVUhseZHT0CMCRnOFhVlJAdpE4tUUcH
AYh7KCP6rm7lXHnJDjoOjrHHrUlJdfIEBxXDVtivWb/GZwed830NHfTb7KAtfut8
NuZofK040hpV5NzsqyarJ5U+xzF0JiRFxSVTN5lOoSlJjPNNXOyObHT1ML8mwJw3
laiqabriRwKBgHtMmvZ2aOJBiyYRYzhj4wnlgxSulOJ2S4I11cbg6McnGPlrDSGa
3fAx1ltmAQp9Af2vJqfQ1fdA76vX1xUQ0O+eU7+7Ilm/oQbG6+jIZaGkKa8UQHZt
dDayFSDuXdmoJXQ3PyT2xzpm0pcr4DRJkL969TQyeFzzZefUr/TGMxvtAoGBAKN3
4ctBEElxeo4bhIejPAiTAJ5ETQr+HCEx+qpriwduzUNjZMGV4E7RWNdrDb4zpyHk
i6a+GJ4k4OuT6plFJpQQgUxmqh8sHK42f+vlVmlyL9kWbPGNfoXQS6zL8X52OkPA
jblU0yURQ1SwwT1ZwAlZTY+hQbp/AqsZ2ARSj3SjAoGAE5EgDjxYgSYMXmB0WoqL
xZQNfWmEKT9/La3KlFOQAzNXmG7vIaiueXMjpiosL74seSRso6M/ESkYYIuGYcIO
snU6qBvvR8Ew2deu0O2calT+X71Ll5Z6JhwBHwxqoPmmTAUss7ZSYJGhtwsk/mLH
K1mI6SpVssosfrxPocI8AZE=
-----END PRIVATE KEY-----";

/// A CA-flagged self-signed certificate named `common_name`, and its key: a test CA, or what
/// `openssl req -x509` makes for an attacker.
pub fn ca(common_name: &str) -> (rcgen::Certificate, rcgen::KeyPair) {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, common_name);
    (params.self_signed(&key).unwrap(), key)
}

/// The files [`ServerCerts::write`] made.
pub struct TlsFiles {
    pub key: PathBuf,
    pub cert: PathBuf,
    /// The CA clients trust.
    pub ca: PathBuf,
}

/// Certificates for one server: a CA and a leaf for 127.0.0.1 and localhost signed by it.
pub struct ServerCerts {
    pub ca: CertificateDer<'static>,
    pub ca_pem: String,
    pub chain: Vec<CertificateDer<'static>>,
    pub key_pem: String,
    pub cert_pem: String,
}

impl ServerCerts {
    pub fn new() -> Self {
        let (ca, ca_key) = ca("kesh test CA");
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let params =
            rcgen::CertificateParams::new(vec!["127.0.0.1".to_owned(), "localhost".to_owned()])
                .unwrap();
        let leaf = params.signed_by(&key, &ca, &ca_key).unwrap();
        ServerCerts {
            ca: ca.der().clone(),
            ca_pem: ca.pem(),
            chain: vec![leaf.der().clone()],
            key_pem: key.serialize_pem(),
            cert_pem: leaf.pem(),
        }
    }

    /// The leaf's private key.
    pub fn private_key(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::from_pem_slice(self.key_pem.as_bytes()).unwrap()
    }

    /// Writes `server.key`, `server.crt` and `ca.crt` into `dir`.
    pub fn write(&self, dir: &Path) -> TlsFiles {
        let files = TlsFiles {
            key: dir.join("server.key"),
            cert: dir.join("server.crt"),
            ca: dir.join("ca.crt"),
        };
        crate::harness::write_private(&files.key, &self.key_pem);
        std::fs::write(&files.cert, &self.cert_pem).unwrap();
        std::fs::write(&files.ca, &self.ca_pem).unwrap();
        files
    }
}

/// The first certificate in a PEM file.
pub fn read_certificate(path: &Path) -> CertificateDer<'static> {
    CertificateDer::from_pem_slice(&std::fs::read(path).unwrap()).unwrap()
}

/// Credentials for a chain and the key that signs the handshake.
pub fn credentials(chain: Vec<CertificateDer<'static>>, key: &rcgen::KeyPair) -> Credentials {
    Credentials::Certificate {
        chain,
        key: PrivateKeyDer::try_from(key.serialize_der()).unwrap(),
    }
}

/// An Ed25519 client certificate (extended key usage clientAuth) named `common_name`, issued
/// by `ca`; its credentials and identity.
pub fn client_cert_issued_by(
    ca: &rcgen::Certificate,
    ca_key: &rcgen::KeyPair,
    common_name: &str,
) -> (Credentials, Identity) {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, common_name);
    params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
    let leaf = params.signed_by(&key, ca, ca_key).unwrap();
    let identity = Identity::from_certificate(leaf.der()).unwrap();
    (credentials(vec![leaf.der().clone()], &key), identity)
}

/// A self-signed client certificate of the given algorithm; returns its credentials and
/// identity.
pub fn client_cert(alg: &'static rcgen::SignatureAlgorithm) -> (Credentials, Identity) {
    let key = if alg == &rcgen::PKCS_RSA_SHA256 {
        rcgen::KeyPair::from_pkcs8_pem_and_sign_algo(RSA_KEY, alg).unwrap()
    } else {
        rcgen::KeyPair::generate_for(alg).unwrap()
    };
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "client");
    let cert = params.self_signed(&key).unwrap();
    let identity = Identity::from_certificate(cert.der()).unwrap();
    (credentials(vec![cert.der().clone()], &key), identity)
}
