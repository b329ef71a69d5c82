//! kesh's own ciphertext framing for the `gcm` and `kwp` schemes (`docs/FORMAT.md` §2–3).
//!
//! ```text
//! gcm: 'k' 0x01 0x01 | iv(12) | aes-256-gcm ciphertext | tag(16)      AAD = context
//! kwp: 'k' 0x01 0x02 | pad(1) | AES-KWP( plaintext | 0x00 * pad | SHA-256(context) )
//! ```
//! `pad` makes the wrapped input a multiple of 8 bytes, so KWP never pads (some modules pad
//! other lengths wrongly); a 32-byte DEK has `pad = 0` and wraps exactly `DEK | SHA-256(ctx)`.

use super::NotAuthentic;

/// First byte of every native ciphertext.
pub const MAGIC: u8 = b'k';
/// The format version that follows it.
pub const VERSION: u8 = 1;
/// Scheme byte of `gcm` ciphertexts.
pub const SCHEME_GCM: u8 = 1;
/// Scheme byte of `kwp` ciphertexts.
pub const SCHEME_KWP: u8 = 2;
/// GCM IV length.
pub const GCM_IV_LEN: usize = 12;
/// GCM tag length.
pub const GCM_TAG_LEN: usize = 16;
const GCM_HEADER: [u8; 3] = [MAGIC, VERSION, SCHEME_GCM];
/// Header (3) + pad byte (1).
pub const KWP_HEADER_LEN: usize = 4;

/// Frames a `gcm` ciphertext: header, IV, then the device's ciphertext‖tag.
pub fn encode_gcm(iv: &[u8; GCM_IV_LEN], ct_and_tag: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(GCM_HEADER.len() + GCM_IV_LEN + ct_and_tag.len());
    out.extend_from_slice(&GCM_HEADER);
    out.extend_from_slice(iv);
    out.extend_from_slice(ct_and_tag);
    out
}

/// Splits a `gcm` ciphertext into IV and ciphertext‖tag.
pub fn parse_gcm(ct: &[u8]) -> Result<([u8; GCM_IV_LEN], &[u8]), NotAuthentic> {
    let body = ct.strip_prefix(&GCM_HEADER[..]).ok_or(NotAuthentic)?;
    if body.len() < GCM_IV_LEN + GCM_TAG_LEN {
        return Err(NotAuthentic);
    }
    let (iv, rest) = body.split_at(GCM_IV_LEN);
    let iv: [u8; GCM_IV_LEN] = iv.try_into().map_err(|_| NotAuthentic)?;
    Ok((iv, rest))
}

/// The bytes the `kwp` scheme wraps, and the pad count that goes in the header.
pub fn kwp_inner(plaintext: &[u8], context: &[u8]) -> (u8, zeroize::Zeroizing<Vec<u8>>) {
    let pad = (8 - (plaintext.len() + 32) % 8) % 8;
    let mut inner = zeroize::Zeroizing::new(Vec::with_capacity(plaintext.len() + pad + 32));
    inner.extend_from_slice(plaintext);
    inner.resize(plaintext.len() + pad, 0);
    inner.extend_from_slice(&super::context_digest(context));
    (pad as u8, inner)
}

/// Frames a `kwp` ciphertext.
pub fn encode_kwp(pad: u8, wrapped: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(KWP_HEADER_LEN + wrapped.len());
    out.extend_from_slice(&[MAGIC, VERSION, SCHEME_KWP, pad]);
    out.extend_from_slice(wrapped);
    out
}

/// Splits a `kwp` ciphertext into its pad count and the wrapped bytes.
pub fn parse_kwp(ct: &[u8]) -> Result<(u8, &[u8]), NotAuthentic> {
    let body = ct
        .strip_prefix(&[MAGIC, VERSION, SCHEME_KWP][..])
        .ok_or(NotAuthentic)?;
    let (&pad, wrapped) = body.split_first().ok_or(NotAuthentic)?;
    // The smallest wrap is of the 32-byte digest alone: 40 bytes, and always a multiple of 8.
    if pad > 7 || wrapped.len() < 40 || wrapped.len() % 8 != 0 {
        return Err(NotAuthentic);
    }
    Ok((pad, wrapped))
}

/// Checks an unwrapped `kwp` inner value against the context and returns the plaintext.
pub fn kwp_open(
    inner: &[u8],
    pad: u8,
    context: &[u8],
) -> Result<zeroize::Zeroizing<Vec<u8>>, NotAuthentic> {
    use subtle::ConstantTimeEq;
    let pad = usize::from(pad);
    if inner.len() < 32 + pad {
        return Err(NotAuthentic);
    }
    let (body, digest) = inner.split_at(inner.len() - 32);
    let expected = super::context_digest(context);
    let digest_ok = digest.ct_eq(&expected);
    let (plaintext, padding) = body.split_at(body.len() - pad);
    let pad_ok = padding.iter().fold(0u8, |acc, b| acc | b).ct_eq(&0);
    if bool::from(digest_ok & pad_ok) {
        Ok(zeroize::Zeroizing::new(plaintext.to_vec()))
    } else {
        Err(NotAuthentic)
    }
}

/// AES-256-GCM seal in the host (soft keystore).
pub fn seal_gcm_soft(
    key: &[u8; 32],
    iv: &[u8; GCM_IV_LEN],
    plaintext: &[u8],
    context: &[u8],
) -> Vec<u8> {
    use aes_gcm::aead::{Aead, KeyInit, Payload};
    let cipher = aes_gcm::Aes256Gcm::new(key.into());
    // Encryption with a 12-byte nonce fails only for plaintexts above 64 GiB, which the
    // 1 MB body limit excludes.
    let sealed = cipher
        .encrypt(
            iv.into(),
            Payload {
                msg: plaintext,
                aad: context,
            },
        )
        .expect("AES-GCM seal of a bounded plaintext");
    encode_gcm(iv, &sealed)
}

/// AES-256-GCM open in the host (soft keystore).
pub fn open_gcm_soft(
    key: &[u8; 32],
    ct: &[u8],
    context: &[u8],
) -> Result<zeroize::Zeroizing<Vec<u8>>, NotAuthentic> {
    use aes_gcm::aead::{Aead, KeyInit, Payload};
    let (iv, sealed) = parse_gcm(ct)?;
    let cipher = aes_gcm::Aes256Gcm::new(key.into());
    cipher
        .decrypt(
            (&iv).into(),
            Payload {
                msg: sealed,
                aad: context,
            },
        )
        .map(zeroize::Zeroizing::new)
        .map_err(|_| NotAuthentic)
}

/// AES-KWP (RFC 5649) wrap in the host (soft keystore).
pub fn seal_kwp_soft(key: &[u8; 32], plaintext: &[u8], context: &[u8]) -> Vec<u8> {
    let (pad, inner) = kwp_inner(plaintext, context);
    let kek = aes_kw::KekAes256::from(*key);
    // Wrapping fails only for inputs longer than 2^32 bytes, which the body limit excludes.
    let wrapped = kek
        .wrap_with_padding_vec(&inner)
        .expect("KWP wrap of a bounded input");
    encode_kwp(pad, &wrapped)
}

/// AES-KWP unwrap in the host (soft keystore).
pub fn open_kwp_soft(
    key: &[u8; 32],
    ct: &[u8],
    context: &[u8],
) -> Result<zeroize::Zeroizing<Vec<u8>>, NotAuthentic> {
    let (pad, wrapped) = parse_kwp(ct)?;
    let kek = aes_kw::KekAes256::from(*key);
    let inner = zeroize::Zeroizing::new(
        kek.unwrap_with_padding_vec(wrapped)
            .map_err(|_| NotAuthentic)?,
    );
    kwp_open(&inner, pad, context)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gcm_round_trip_and_context_binding() {
        let key = [7u8; 32];
        let iv = [1u8; 12];
        let ct = seal_gcm_soft(&key, &iv, b"dek", b"ctx");
        assert_eq!(ct.len(), 3 + 12 + 3 + 16);
        assert_eq!(&open_gcm_soft(&key, &ct, b"ctx").unwrap()[..], b"dek");
        assert_eq!(open_gcm_soft(&key, &ct, b"other"), Err(NotAuthentic));
        assert_eq!(
            open_gcm_soft(&key, &ct[..ct.len() - 1], b"ctx"),
            Err(NotAuthentic)
        );
    }

    #[test]
    fn kwp_pads_to_whole_blocks() {
        let key = [9u8; 32];
        for len in 0..20 {
            let pt = vec![0xAB; len];
            let ct = seal_kwp_soft(&key, &pt, b"c");
            assert_eq!((ct.len() - KWP_HEADER_LEN) % 8, 0);
            assert_eq!(&open_kwp_soft(&key, &ct, b"c").unwrap()[..], &pt[..]);
            assert!(open_kwp_soft(&key, &ct, b"d").is_err());
        }
        let (pad, inner) = kwp_inner(&[0u8; 32], b"");
        assert_eq!((pad, inner.len()), (0, 64));
    }
}
