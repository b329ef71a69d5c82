//! Client identities and `kes:v1:` API keys (docs/api.md, "Authentication and
//! authorization"; the key format: `kes/apikey.go` at github.com/minio/kms-go).
//!
//! An [`Identity`] is what policies and the admin setting name: for a TLS client it is the
//! lowercase hex SHA-256 of the SubjectPublicKeyInfo DER of the certificate whose key signed
//! the handshake ([`identify_peer`]). An [`ApiKey`] is an Ed25519 seed in KES's text form;
//! clients turn it into a self-signed certificate whose identity is the hash of the Ed25519
//! SPKI.

use std::fmt;

use base64::Engine as _;
use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

use crate::name::KeyName;

/// A client identity: a name by the KES rules (docs/api.md, "Names and patterns"). Certificate-derived identities are 64
/// lowercase hex characters; configured ones may be any valid name (`disabled` turns the admin
/// off because no certificate hashes to it).
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Identity(String);

/// Why an identity string was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("identity '{0}' is empty, too long or contains invalid characters")]
pub struct InvalidIdentity(pub String);

impl Identity {
    /// Validates `s` with the same rules as key names.
    pub fn new(s: &str) -> Result<Self, InvalidIdentity> {
        // Identities share the name grammar of keys (kes `validName`); reuse its checker.
        match KeyName::new(s) {
            Ok(_) => Ok(Identity(s.to_owned())),
            Err(_) => Err(InvalidIdentity(s.to_owned())),
        }
    }

    /// The configured admin, taken as written: KES accepts any string there, and one that is
    /// not a key hash matches no client, which turns admin access off ([`Self::is_hash`]).
    pub fn admin(s: &str) -> Self {
        Identity(s.trim().to_owned())
    }

    /// The identity of a certificate's public key: hex(SHA-256(SPKI DER)).
    pub fn from_spki(spki_der: &[u8]) -> Self {
        Identity(hex::encode(Sha256::digest(spki_der)))
    }

    /// The identity of a DER certificate (its leaf SPKI hashed).
    pub fn from_certificate(cert_der: &[u8]) -> Result<Self, CertError> {
        Ok(Self::from_spki(spki_of_certificate(cert_der)?))
    }

    /// Equality in time independent of where the two differ: the admin check runs on every
    /// request, and must not tell a prober how much of the admin identity it guessed.
    pub fn ct_eq(&self, other: &Identity) -> bool {
        use subtle::ConstantTimeEq;
        let (a, b) = (self.as_str().as_bytes(), other.as_str().as_bytes());
        a.len() == b.len() && bool::from(a.ct_eq(b))
    }

    /// The identity's text (64 lowercase hex digits for certificate identities).
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Whether a certificate could ever hash to this identity (64 lowercase hex digits).
    /// A configured admin that is not is "disabled".
    pub fn is_hash(&self) -> bool {
        self.0.len() == 64
            && self
                .0
                .bytes()
                .all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
    }
}

crate::name::text_fmt!(Identity);

/// A certificate whose SubjectPublicKeyInfo could not be located.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("malformed X.509 certificate")]
pub struct CertError;

/// One DER element and what follows it.
struct Element<'a> {
    tag: u8,
    whole: &'a [u8],
    content: &'a [u8],
    rest: &'a [u8],
}

fn der_element(input: &[u8]) -> Result<Element<'_>, CertError> {
    let (&tag, after_tag) = input.split_first().ok_or(CertError)?;
    let (&first, after_len) = after_tag.split_first().ok_or(CertError)?;
    let (len, header) = if first < 0x80 {
        (usize::from(first), 2)
    } else {
        let n = usize::from(first & 0x7f);
        if n == 0 || n > 4 || after_len.len() < n {
            return Err(CertError);
        }
        let len = after_len[..n]
            .iter()
            .fold(0usize, |acc, &b| (acc << 8) | usize::from(b));
        (len, 2 + n)
    };
    let end = header.checked_add(len).ok_or(CertError)?;
    if input.len() < end {
        return Err(CertError);
    }
    Ok(Element {
        tag,
        whole: &input[..end],
        content: &input[header..end],
        rest: &input[end..],
    })
}

/// The content of a SEQUENCE element.
fn sequence_content<'a>(e: &Element<'a>) -> Result<&'a [u8], CertError> {
    const SEQUENCE: u8 = 0x30;
    if e.tag != SEQUENCE {
        return Err(CertError);
    }
    Ok(e.content)
}

/// The SubjectPublicKeyInfo element and everything after it in the TBSCertificate.
fn spki_and_rest(cert_der: &[u8]) -> Result<Element<'_>, CertError> {
    let cert = sequence_content(&der_element(cert_der)?)?;
    let mut rest = sequence_content(&der_element(cert)?)?;
    // Optional `[0] EXPLICIT Version`.
    if rest.first() == Some(&0xa0) {
        rest = der_element(rest)?.rest;
    }
    // serialNumber, signature, issuer, validity, subject.
    for _ in 0..5 {
        rest = der_element(rest)?.rest;
    }
    let spki = der_element(rest)?;
    sequence_content(&spki)?;
    Ok(spki)
}

/// The SubjectPublicKeyInfo DER inside an X.509 certificate (RFC 5280 §4.1).
pub fn spki_of_certificate(cert_der: &[u8]) -> Result<&[u8], CertError> {
    Ok(spki_and_rest(cert_der)?.whole)
}

/// The value (the OCTET STRING's content) of the extension with `oid`, if present.
fn extension<'a>(cert_der: &'a [u8], oid: &[u8]) -> Result<Option<&'a [u8]>, CertError> {
    let mut rest = spki_and_rest(cert_der)?.rest;
    while !rest.is_empty() {
        let e = der_element(rest)?;
        rest = e.rest;
        // `[3] EXPLICIT Extensions`; `[1]`/`[2]` unique IDs are skipped.
        if e.tag != 0xa3 {
            continue;
        }
        let mut exts = sequence_content(&der_element(e.content)?)?;
        while !exts.is_empty() {
            let ext = der_element(exts)?;
            exts = ext.rest;
            let id = der_element(sequence_content(&ext)?)?;
            if id.tag != 0x06 || id.content != oid {
                continue;
            }
            let mut value = der_element(id.rest)?;
            if value.tag == 0x01 {
                // The optional `critical` flag.
                value = der_element(value.rest)?;
            }
            if value.tag != 0x04 {
                return Err(CertError);
            }
            return Ok(Some(value.content));
        }
    }
    Ok(None)
}

/// Whether the certificate's basic constraints say `cA: TRUE` (RFC 5280 §4.2.1.9).
pub fn is_ca_certificate(cert_der: &[u8]) -> Result<bool, CertError> {
    const BASIC_CONSTRAINTS: [u8; 3] = [0x55, 0x1d, 0x13];
    let Some(value) = extension(cert_der, &BASIC_CONSTRAINTS)? else {
        return Ok(false);
    };
    let constraints = sequence_content(&der_element(value)?)?;
    Ok(match constraints.first() {
        Some(0x01) => der_element(constraints)?
            .content
            .first()
            .is_some_and(|b| *b != 0),
        _ => false,
    })
}

/// Whether the certificate names at least one DNS name or IP address in its subject
/// alternative names (RFC 5280 §4.2.1.6), as KES requires of a server certificate.
pub fn has_dns_or_ip_san(cert_der: &[u8]) -> Result<bool, CertError> {
    const SUBJECT_ALT_NAME: [u8; 3] = [0x55, 0x1d, 0x11];
    const DNS_NAME: u8 = 0x82;
    const IP_ADDRESS: u8 = 0x87;
    let Some(value) = extension(cert_der, &SUBJECT_ALT_NAME)? else {
        return Ok(false);
    };
    let mut names = sequence_content(&der_element(value)?)?;
    while !names.is_empty() {
        let name = der_element(names)?;
        if name.tag == DNS_NAME || name.tag == IP_ADDRESS {
            return Ok(true);
        }
        names = name.rest;
    }
    Ok(false)
}

/// Why a connection has no usable client identity (docs/api.md, "Authentication and authorization").
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PeerError {
    /// The client sent no certificate.
    #[error("tls: client certificate is required")]
    NoCertificate,
    /// The client sent a second end-entity certificate.
    #[error("tls: received more than one client certificate")]
    MoreThanOne,
}

/// The identity of a TLS peer: the key of the first certificate of its chain, the one whose
/// private key signed the handshake (rustls verifies the signature against `chain[0]`, in
/// both `tls.auth` modes). Certificates after it may only be CA certificates (a client's
/// issuing chain, ignored); a second end-entity certificate is refused, because nothing
/// proves the peer holds its key. KES instead hashes the first certificate that is not a CA,
/// wherever it sits, which lets a client that signs with its own CA-flagged certificate
/// present anyone's public key (docs/SECURITY.md, "Identities").
pub fn identify_peer<C: AsRef<[u8]>>(chain: &[C]) -> Result<Identity, PeerError> {
    let (signer, rest) = chain.split_first().ok_or(PeerError::NoCertificate)?;
    if rest
        .iter()
        .any(|c| !is_ca_certificate(c.as_ref()).unwrap_or(false))
    {
        return Err(PeerError::MoreThanOne);
    }
    Identity::from_certificate(signer.as_ref()).map_err(|_| PeerError::NoCertificate)
}

/// The DER prefix of an Ed25519 SubjectPublicKeyInfo; the 32-byte public key follows.
const ED25519_SPKI_PREFIX: [u8; 12] = [
    0x30, 0x2a, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x03, 0x21, 0x00,
];
/// The DER prefix of an Ed25519 PKCS#8 v1 private key; the 32-byte seed follows.
const ED25519_PKCS8_PREFIX: [u8; 16] = [
    0x30, 0x2e, 0x02, 0x01, 0x00, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22, 0x04, 0x20,
];

/// Why an API key text was refused; messages match kms-go.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ApiKeyError {
    /// The decoded key is not 33 bytes.
    #[error("kes: invalid API key: invalid length")]
    InvalidLength,
    /// The type byte is not 0 (Ed25519).
    #[error("kes: invalid API key: unsupported type")]
    UnsupportedType,
    /// The text after the optional `kes:v1:` is not standard base64.
    #[error("kes: invalid API key: {0}")]
    Malformed(String),
}

/// A KES API key: an Ed25519 seed. Never printed; [`ApiKey::expose_text`] gives the text form
/// for the one place that shows it to an operator.
pub struct ApiKey {
    seed: Zeroizing<[u8; 32]>,
}

impl ApiKey {
    const PREFIX: &'static str = "kes:v1:";

    /// A fresh key from the OS random generator.
    pub fn generate() -> Result<Self, getrandom::Error> {
        Ok(ApiKey {
            seed: crate::secret::random::<32>()?,
        })
    }

    /// Parses `kes:v1:<base64 of 0x00 || seed>`; the prefix is optional, as in kms-go.
    pub fn parse(text: &str) -> Result<Self, ApiKeyError> {
        let b64 = text.strip_prefix(Self::PREFIX).unwrap_or(text);
        let raw = Zeroizing::new(
            base64::engine::general_purpose::STANDARD
                .decode(b64)
                .map_err(|e| ApiKeyError::Malformed(e.to_string()))?,
        );
        if raw.len() != 33 {
            return Err(ApiKeyError::InvalidLength);
        }
        if raw[0] != 0 {
            return Err(ApiKeyError::UnsupportedType);
        }
        let mut seed = Zeroizing::new([0u8; 32]);
        seed.copy_from_slice(&raw[1..]);
        Ok(ApiKey { seed })
    }

    /// The text form `kes:v1:...`. This is a credential: show it once, never log it.
    pub fn expose_text(&self) -> Zeroizing<String> {
        let mut raw = Zeroizing::new([0u8; 33]);
        raw[1..].copy_from_slice(self.seed.as_ref());
        Zeroizing::new(format!(
            "{}{}",
            Self::PREFIX,
            base64::engine::general_purpose::STANDARD.encode(raw.as_ref())
        ))
    }

    /// The Ed25519 public key of the seed.
    pub fn public_key(&self) -> [u8; 32] {
        use ring::signature::KeyPair as _;
        // Invariant: `from_seed_unchecked` only rejects seeds that are not 32 bytes long, and
        // `seed` is a `[u8; 32]`.
        #[allow(clippy::expect_used)]
        let pair = ring::signature::Ed25519KeyPair::from_seed_unchecked(self.seed.as_ref())
            .expect("a 32-byte Ed25519 seed is always valid");
        let mut out = [0u8; 32];
        out.copy_from_slice(pair.public_key().as_ref());
        out
    }

    /// The Ed25519 SubjectPublicKeyInfo DER.
    pub fn spki_der(&self) -> Vec<u8> {
        let mut spki = ED25519_SPKI_PREFIX.to_vec();
        spki.extend_from_slice(&self.public_key());
        spki
    }

    /// The identity a server computes for this key's certificate.
    pub fn identity(&self) -> Identity {
        Identity::from_spki(&self.spki_der())
    }

    /// The private key as PKCS#8 v1 DER (what TLS libraries load).
    pub fn pkcs8_der(&self) -> Zeroizing<Vec<u8>> {
        let mut der = Zeroizing::new(ED25519_PKCS8_PREFIX.to_vec());
        der.extend_from_slice(self.seed.as_ref());
        der
    }

    /// The self-signed client certificate KES clients make from an API key (kms-go:
    /// `kes/apikey.go`): CN =
    /// identity, 90 days, EKU clientAuth, not a CA. Returns (certificate DER, PKCS#8 key DER).
    pub fn certificate(&self) -> Result<(Vec<u8>, Zeroizing<Vec<u8>>), rcgen::Error> {
        let pkcs8 = self.pkcs8_der();
        let key_der = rustls_pki_types::PrivatePkcs8KeyDer::from(pkcs8.as_slice());
        let key = rcgen::KeyPair::from_pkcs8_der_and_sign_algo(&key_der, &rcgen::PKCS_ED25519)?;
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new())?;
        params.distinguished_name = rcgen::DistinguishedName::new();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, self.identity().as_str());
        let now = time::OffsetDateTime::now_utc();
        params.not_before = now - time::Duration::minutes(1);
        params.not_after = now + time::Duration::days(90);
        params.key_usages = vec![rcgen::KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
        params.is_ca = rcgen::IsCa::ExplicitNoCa;
        let cert = params.self_signed(&key)?;
        Ok((cert.der().to_vec(), pkcs8))
    }
}

impl fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ApiKey(<redacted>, identity {})", self.identity())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn api_key_vectors() {
        for (key, id) in [
            (
                "kes:v1:AGaV6VXHasF0FnaB60WdCOeTZ8eTIDikL4zlN16c8NAs",
                "ea9826089311fe44d7590408ede9150f7c637b6cab0a91ee6fe1aa5d9fb366f6",
            ),
            (
                "kes:v1:ACQpoGqx3rHHjT938Hfu5hVVQJHZWSqVI2Xp1KlYxFVw",
                "0426fa9a04bc2756b92fbe8a97e1a1e07b53ecf04ed33da22c33e5c9faeb8cbb",
            ),
            (
                "kes:v1:AMxvd2uV1l5dDSRwuKZxSjuM5BDemlr+685+JAHA1TuJ",
                "ab785e3b95d80d72cc9c27cb9fde886a0bf9068a69d40e3bd08a54e68c3f2bf7",
            ),
        ] {
            let k = ApiKey::parse(key).unwrap();
            assert_eq!(k.identity().as_str(), id);
            assert_eq!(k.expose_text().as_str(), key);
            assert!(k.identity().is_hash());
        }
    }

    #[test]
    fn api_key_errors() {
        assert_eq!(
            ApiKey::parse("kes:v1:AAAA").unwrap_err(),
            ApiKeyError::InvalidLength
        );
        assert_eq!(
            ApiKey::parse("kes:v1:AWaV6VXHasF0FnaB60WdCOeTZ8eTIDikL4zlN16c8NAs")
                .unwrap_err()
                .to_string(),
            "kes: invalid API key: unsupported type"
        );
        assert!(matches!(
            ApiKey::parse("kes:v1:!!"),
            Err(ApiKeyError::Malformed(_))
        ));
    }

    #[test]
    fn constant_time_equality() {
        let a = Identity::new("ab").unwrap();
        assert!(a.ct_eq(&Identity::new("ab").unwrap()));
        assert!(!a.ct_eq(&Identity::new("ac").unwrap()));
        assert!(!a.ct_eq(&Identity::new("abc").unwrap()));
    }

    #[test]
    fn server_certificates_need_a_dns_or_ip_san() {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let with_dns = rcgen::CertificateParams::new(vec!["kesh.example".to_owned()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        assert!(has_dns_or_ip_san(with_dns.der()).unwrap());
        let mut ip = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        ip.subject_alt_names = vec![rcgen::SanType::IpAddress([127, 0, 0, 1].into())];
        assert!(has_dns_or_ip_san(ip.self_signed(&key).unwrap().der()).unwrap());
        let mut email = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        email.subject_alt_names = vec![rcgen::SanType::Rfc822Name("a@b.c".try_into().unwrap())];
        assert!(!has_dns_or_ip_san(email.self_signed(&key).unwrap().der()).unwrap());
        // Client certificates made from API keys carry no SAN at all.
        let (cert, _) = ApiKey::generate().unwrap().certificate().unwrap();
        assert!(!has_dns_or_ip_san(&cert).unwrap());
        assert!(!is_ca_certificate(&cert).unwrap());
    }

    #[test]
    fn certificate_identity_matches_api_key() {
        let k = ApiKey::generate().unwrap();
        let (cert, _) = k.certificate().unwrap();
        assert_eq!(Identity::from_certificate(&cert).unwrap(), k.identity());
        assert!(!format!("{k:?}").contains(&*k.expose_text()));
    }

    #[test]
    fn the_peer_is_the_certificate_that_signed_the_handshake() {
        let ca_key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let ca = ca.self_signed(&ca_key).unwrap();
        let ca_identity = Identity::from_spki(ca_key.public_key_der().as_slice());
        let k = ApiKey::generate().unwrap();
        let (leaf, _) = k.certificate().unwrap();
        let (other, _) = ApiKey::generate().unwrap().certificate().unwrap();
        assert!(is_ca_certificate(ca.der()).unwrap());
        assert!(!is_ca_certificate(&leaf).unwrap());
        let ca = ca.der().to_vec();
        // A client's own chain: its certificate first, its issuers after.
        assert_eq!(
            identify_peer(&[leaf.clone(), ca.clone()]).unwrap(),
            k.identity()
        );
        // The forgery: signed with the CA-flagged certificate's key, carrying another key
        // behind it. It must never be served as that other key.
        assert_eq!(
            identify_peer(&[ca.clone(), leaf.clone()]).unwrap_err(),
            PeerError::MoreThanOne
        );
        // A lone self-signed certificate with `CA:TRUE` (`openssl req -x509`) signed the
        // handshake itself: it is the peer.
        assert_eq!(
            identify_peer(std::slice::from_ref(&ca)).unwrap(),
            ca_identity
        );
        assert_eq!(
            identify_peer::<Vec<u8>>(&[]).unwrap_err(),
            PeerError::NoCertificate
        );
        assert_eq!(
            identify_peer(&[leaf, other]).unwrap_err(),
            PeerError::MoreThanOne
        );
    }

    #[test]
    fn identity_names() {
        assert!(Identity::new("disabled").is_ok());
        assert!(!Identity::new("disabled").unwrap().is_hash());
        assert!(Identity::new("a.b").is_err());
        assert!(Identity::new("").is_err());
        assert!(spki_of_certificate(b"\x30\x03\x02\x01").is_err());
    }
}
