//! KES's ciphertext formats (docs/FORMAT.md §5; KES:
//! `internal/crypto/key.go` and `ciphertext.go` at github.com/minio/kes), bit for bit.
//!
//! ```text
//! current: AEAD(derived_key, nonce, plaintext, aad = context) | iv(16) | nonce(12)
//!   AES256:   derived_key = HMAC-SHA256(master, iv), AEAD = AES-256-GCM
//!   ChaCha20: derived_key = HChaCha20(master, iv),   AEAD = ChaCha20-Poly1305
//! legacy:  MessagePack fixarray(5) [alg, id, iv, nonce, sealed]   (first byte 0x95)
//!          JSON {"aead","id","iv","nonce","bytes"}                  (first byte '{')
//! ```
//! Legacy values convert to `sealed | iv | nonce`; a legacy parse failure falls back to the
//! current format, as KES does.

use std::borrow::Cow;

use base64::Engine;

use super::NotAuthentic;
use crate::secret::Key32;

/// Length of the IV KES derives each message key from.
pub const IV_LEN: usize = 16;
/// Length of the AEAD nonce.
pub const NONCE_LEN: usize = 12;
/// Length of the AEAD tag.
pub const TAG_LEN: usize = 16;
/// Every KES ciphertext ends in `iv | nonce`.
pub const TRAILER_LEN: usize = IV_LEN + NONCE_LEN;

/// The secret-key type of a KES key (KES: `internal/crypto/key.go`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Algorithm {
    /// AES-256 (AES-256-GCM with HMAC-SHA256-derived message keys).
    Aes256,
    /// ChaCha20 (ChaCha20-Poly1305 with HChaCha20-derived message keys; soft keystore only).
    ChaCha20,
}

impl Algorithm {
    /// The name `describe` reports.
    pub fn as_str(self) -> &'static str {
        match self {
            Algorithm::Aes256 => "AES256",
            Algorithm::ChaCha20 => "ChaCha20",
        }
    }

    /// Parses a `cipher` of `/v1/key/import` (case-sensitive, as KES).
    pub fn from_import_name(s: &str) -> Option<Self> {
        match s {
            "AES256" | "AES256-GCM_SHA256" => Some(Algorithm::Aes256),
            "ChaCha20" | "XCHACHA20-POLY1305" => Some(Algorithm::ChaCha20),
            _ => None,
        }
    }
}

/// A KES ciphertext split into its parts.
#[derive(Debug)]
pub struct Parts<'a> {
    /// The AEAD output: ciphertext and tag.
    pub sealed: Cow<'a, [u8]>,
    /// The IV the message key was derived from.
    pub iv: [u8; IV_LEN],
    /// The AEAD nonce.
    pub nonce: [u8; NONCE_LEN],
}

/// Parses any KES ciphertext, converting the legacy containers.
pub fn parse(ct: &[u8]) -> Result<Parts<'_>, NotAuthentic> {
    let legacy = match ct.first() {
        Some(0x95) => parse_msgpack(ct),
        Some(b'{') => parse_json(ct),
        _ => None,
    };
    if let Some(parts) = legacy {
        return Ok(parts);
    }
    if ct.len() <= TRAILER_LEN {
        return Err(NotAuthentic);
    }
    let (sealed, trailer) = ct.split_at(ct.len() - TRAILER_LEN);
    let (iv, nonce) = trailer.split_at(IV_LEN);
    Ok(Parts {
        sealed: Cow::Borrowed(sealed),
        iv: iv.try_into().map_err(|_| NotAuthentic)?,
        nonce: nonce.try_into().map_err(|_| NotAuthentic)?,
    })
}

fn parse_msgpack(ct: &[u8]) -> Option<Parts<'static>> {
    let mut r = MsgpackReader { buf: ct.get(1..)? };
    let alg = r.str()?;
    Algorithm::from_import_name(alg)?;
    let _id = r.str()?;
    let iv = r.bin()?.try_into().ok()?;
    let nonce = r.bin()?.try_into().ok()?;
    let sealed = r.bin()?.to_vec();
    if !r.buf.is_empty() {
        return None;
    }
    Some(Parts {
        sealed: Cow::Owned(sealed),
        iv,
        nonce,
    })
}

/// Reads just the MessagePack types KES wrote: strings and binaries.
struct MsgpackReader<'a> {
    buf: &'a [u8],
}

impl<'a> MsgpackReader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.buf.len() < n {
            return None;
        }
        let (head, tail) = self.buf.split_at(n);
        self.buf = tail;
        Some(head)
    }

    fn len_be(&mut self, width: usize) -> Option<usize> {
        let bytes = self.take(width)?;
        Some(
            bytes
                .iter()
                .fold(0usize, |acc, &b| (acc << 8) | usize::from(b)),
        )
    }

    fn str(&mut self) -> Option<&'a str> {
        let tag = *self.take(1)?.first()?;
        let len = match tag {
            0xa0..=0xbf => usize::from(tag & 0x1f),
            0xd9 => self.len_be(1)?,
            0xda => self.len_be(2)?,
            0xdb => self.len_be(4)?,
            _ => return None,
        };
        std::str::from_utf8(self.take(len)?).ok()
    }

    fn bin(&mut self) -> Option<&'a [u8]> {
        let tag = *self.take(1)?.first()?;
        let len = match tag {
            0xc4 => self.len_be(1)?,
            0xc5 => self.len_be(2)?,
            0xc6 => self.len_be(4)?,
            _ => return None,
        };
        self.take(len)
    }
}

fn parse_json(ct: &[u8]) -> Option<Parts<'static>> {
    // Go's encoding/json matches field names case-insensitively; the last duplicate wins.
    let value: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(ct).ok()?;
    let field = |name: &str| {
        value
            .iter()
            .rev()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .and_then(|(_, v)| v.as_str())
    };
    match field("aead")? {
        "AES-256-GCM-HMAC-SHA-256" | "ChaCha20Poly1305" => {}
        _ => return None,
    }
    let b64 = |name: &str| {
        base64::engine::general_purpose::STANDARD
            .decode(field(name)?)
            .ok()
    };
    let iv = b64("iv")?.try_into().ok()?;
    let nonce = b64("nonce")?.try_into().ok()?;
    let sealed = b64("bytes")?;
    Some(Parts {
        sealed: Cow::Owned(sealed),
        iv,
        nonce,
    })
}

/// Derives the per-message key in the host (soft keystore). The pkcs11 keystore computes the
/// AES256 derivation with `CKM_SHA256_HMAC` on the device instead.
pub fn derive_soft(alg: Algorithm, master: &[u8; 32], iv: &[u8; IV_LEN]) -> Key32 {
    match alg {
        Algorithm::Aes256 => zeroize::Zeroizing::new(super::hmac_sha256(master, iv)),
        Algorithm::ChaCha20 => {
            let out = chacha20::hchacha::<chacha20::cipher::consts::U10>(master.into(), iv.into());
            zeroize::Zeroizing::new(out.into())
        }
    }
}

/// Seals with an already derived key: `AEAD(derived, nonce, pt, ctx) | iv | nonce`.
pub fn seal(
    alg: Algorithm,
    derived: &[u8; 32],
    iv: &[u8; IV_LEN],
    nonce: &[u8; NONCE_LEN],
    plaintext: &[u8],
    context: &[u8],
) -> Vec<u8> {
    use aes_gcm::aead::{AeadInPlace, KeyInit};
    let mut out = Vec::with_capacity(plaintext.len() + TAG_LEN + TRAILER_LEN);
    out.extend_from_slice(plaintext);
    // Both AEADs fail only beyond 64 GiB of plaintext; the body limit is 1 MB.
    match alg {
        Algorithm::Aes256 => aes_gcm::Aes256Gcm::new(derived.into())
            .encrypt_in_place(nonce.into(), context, &mut out)
            .expect("AES-GCM seal of a bounded plaintext"),
        Algorithm::ChaCha20 => chacha20poly1305::ChaCha20Poly1305::new(derived.into())
            .encrypt_in_place(nonce.into(), context, &mut out)
            .expect("ChaCha20-Poly1305 seal of a bounded plaintext"),
    }
    out.extend_from_slice(iv);
    out.extend_from_slice(nonce);
    out
}

/// Opens parsed parts with an already derived key.
pub fn open(
    alg: Algorithm,
    derived: &[u8; 32],
    parts: &Parts<'_>,
    context: &[u8],
) -> Result<zeroize::Zeroizing<Vec<u8>>, NotAuthentic> {
    use aes_gcm::aead::{AeadInPlace, KeyInit};
    if parts.sealed.len() < TAG_LEN {
        return Err(NotAuthentic);
    }
    let mut buf = zeroize::Zeroizing::new(parts.sealed.to_vec());
    let nonce = (&parts.nonce).into();
    let res = match alg {
        Algorithm::Aes256 => {
            aes_gcm::Aes256Gcm::new(derived.into()).decrypt_in_place(nonce, context, &mut *buf)
        }
        Algorithm::ChaCha20 => chacha20poly1305::ChaCha20Poly1305::new(derived.into())
            .decrypt_in_place(nonce, context, &mut *buf),
    };
    res.map(|()| buf).map_err(|_| NotAuthentic)
}

#[cfg(test)]
mod tests {
    //! The vectors of docs/FORMAT.md §5 (from KES's `internal/crypto/key_test.go`), checked in the host. The keystore suite checks the same
    //! vectors through both backends.
    use super::*;

    fn b64(s: &str) -> Vec<u8> {
        base64::engine::general_purpose::STANDARD.decode(s).unwrap()
    }

    fn open_soft(
        alg: Algorithm,
        key: &[u8; 32],
        ct: &[u8],
        aad: &[u8],
    ) -> Result<Vec<u8>, NotAuthentic> {
        let parts = parse(ct)?;
        let derived = derive_soft(alg, key, &parts.iv);
        open(alg, &derived, &parts, aad).map(|p| p.to_vec())
    }

    #[test]
    fn zero_key_vectors() {
        let key = [0u8; 32];
        let current =
            b64("zwdDgHeRlIFRnJ7+DIhs/ka7GFK2CFSfDELqg1VCyTQzZ58o7MAdupMLk3ZjlMo2ZUDwldL2o41nAWDc");
        assert_eq!(
            open_soft(Algorithm::Aes256, &key, &current, b"").unwrap(),
            vec![0u8; 16]
        );
        let json_aes = br#"{"aead":"AES-256-GCM-HMAC-SHA-256","iv":"xLxIN3tSCkg2xMafuvwUwg==","nonce":"gu0mGwUkwcvMEoi5","bytes":"WVgRjeIJm3w50C/l+y7y2i6mbNg5NCAqN1zvOYWZKmc="}"#;
        assert_eq!(
            open_soft(Algorithm::Aes256, &key, json_aes, b"").unwrap(),
            vec![0u8; 16]
        );
        let json_chacha = br#"{"aead":"ChaCha20Poly1305","iv":"s3fSZ6vk5m+DfQA8yZWeUg==","nonce":"8/kHMnCMs3h9NZ2a","bytes":"cw22HjLq/4cx8507SW4hhSrYbDiMuRao4b5+GE+XfbE="}"#;
        assert_eq!(
            open_soft(Algorithm::ChaCha20, &key, json_chacha, b"").unwrap(),
            vec![0u8; 16]
        );
        let mp_aes = b64("lbFBRVMyNTYtR0NNX1NIQTI1NtkgNjY2ODdhYWRmODYyYmQ3NzZjOGZjMThiOGU5ZjhlMjDEEExv7LAd4oz0SaHZrX5LBufEDEKME1ow1CDfUFrqv8QgJuy7Sw+jVqz99TK1HV851LT3K4mwwDv46TB2ngWkAJQ=");
        assert_eq!(
            open_soft(Algorithm::Aes256, &key, &mp_aes, b"").unwrap(),
            vec![0u8; 16]
        );
        let mp_chacha = b64("lbJYQ0hBQ0hBMjAtUE9MWTEzMDXZIDY2Njg3YWFkZjg2MmJkNzc2YzhmYzE4YjhlOWY4ZTIwxBBAr+aptD4x2+qfOhiErbnkxAxYs8RmNC1JJXD1hiHEIJ2KqM0jjkME7ndx8nyVseesN83Np0rM5ejVUun+fNFu");
        assert_eq!(
            open_soft(Algorithm::ChaCha20, &key, &mp_chacha, b"").unwrap(),
            vec![0u8; 16]
        );
    }

    #[test]
    fn keyed_vectors_round_trip_bit_for_bit() {
        let key: [u8; 32] = b64("dDHbTWgo+Yh3u804SYB5OyVMy6RiLeJYBQth1f6KlEU=")
            .try_into()
            .unwrap();
        let aad = [0u8; 16];
        let pt = b64("CLcJoykFCWZDkEIiUq9bJRqwCwW9ZDvdgu8EMA==");
        for (alg, ct) in [
            (Algorithm::Aes256, "s2gmfQHeGdlyL8x1yEWSACUV3GrSoz3t160hugMgzKWgyqesXDVUJ5Dw5Mt076rR1PNiU9X4YjLH14D8a81t2r2xsz4gVZac"),
            (Algorithm::ChaCha20, "gO4woRIswAJdjUjW7z2ApsSQxJlwB24yjLrmH4eI7sB0uh5nfEJfk9ybTPFft5FRFaZCVBmzhx7OJs9n0WWtxH3sySIxecIK"),
        ] {
            let ct = b64(ct);
            assert_eq!(open_soft(alg, &key, &ct, &aad).unwrap(), pt);
            let parts = parse(&ct).unwrap();
            let derived = derive_soft(alg, &key, &parts.iv);
            assert_eq!(seal(alg, &derived, &parts.iv, &parts.nonce, &pt, &aad), ct, "{alg:?} reseal");
            assert!(open_soft(alg, &key, &ct, b"wrong").is_err());
        }
    }

    #[test]
    fn malformed_legacy_values_fail() {
        let key = [0u8; 32];
        for bad in [
            r#"{"aead":"AES-256-GCM","iv":"xLxIN3tSCkg2xMafuvwUwg==","nonce":"gu0mGwUkwcvMEoi5","bytes":"WVgRjeIJm3w50C/l+y7y2i6mbNg5NCAqN1zvOYWZKmc="}"#,
            r#"{"aead":"AES-256-GCM-HMAC-SHA-256","iv":"xLxIN3tSCkg2xMafuvwUwgAAAAA=","nonce":"gu0mGwUkwcvMEoi5","bytes":"WVgRjeIJm3w50C/l+y7y2i6mbNg5NCAqN1zvOYWZKmc="}"#,
            r#"{"aead":"AES-256-GCM-HMAC-SHA-256","iv":"xLxIN3tSCkg2xMafuvwUwg==","nonce":"gu0mGwUkwcs=","bytes":"WVgRjeIJm3w50C/l+y7y2i6mbNg5NCAqN1zvOYWZKmc="}"#,
            r#"{"aead":"AES-256-GCM-HMAC-SHA-256","iv":"xLxIN3tSCkg2xMafuvwUwg==","nonce":"gu0mGwUkwcvMEoi5","bytes":"XVgRjeIJm3w50C/l+y7y2i6mbNg5NCAqN1zvOYWZKmc="}"#,
            r#"{"aead":"AES-256-GCM-HMAC-SHA-256" "iv":"xLxIN3tSCkg2xMafuvwUwg==","nonce":"gu0mGwUkwcvMEoi5","bytes":"WVgRjeIJm3w50C/l+y7y2i6mbNg5NCAqN1zvOYWZKmc="}"#,
        ] {
            assert!(
                open_soft(Algorithm::Aes256, &key, bad.as_bytes(), b"").is_err(),
                "{bad}"
            );
        }
        assert!(parse(&[0u8; 28]).is_err());
    }
}
