//! The key-version envelope (`docs/FORMAT.md` §8): how a ciphertext names the key version that
//! sealed it.
//!
//! Version 1 ciphertexts are exactly the format of their scheme (§2–5), so everything written
//! before rotation existed, and KES ciphertexts of imported keys, read as version 1. A
//! ciphertext of version N ≥ 2 is `'k' 0x02 | N (u32 big-endian) | the version-1 format`.
//! A `kes` ciphertext has no header and may begin with any bytes, so a reader that finds no
//! such version, or whose version fails to open it, also tries the whole input as version 1.

/// `'k'` then the envelope's format byte (the native formats use 0x01).
pub const MAGIC: [u8; 2] = [b'k', 0x02];
/// Magic (2) + version (4).
pub const HEADER_LEN: usize = 6;

/// The ciphertext of key version `version` around `inner`, a ciphertext in its scheme's
/// version-1 format. Version 1 is returned as it is.
pub fn wrap(version: u32, inner: Vec<u8>) -> Vec<u8> {
    if version <= 1 {
        return inner;
    }
    let mut out = Vec::with_capacity(HEADER_LEN + inner.len());
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&version.to_be_bytes());
    out.extend_from_slice(&inner);
    out
}

/// The key version a ciphertext names and the ciphertext inside, when it has the envelope
/// (with a version of 2 or more: each ciphertext has one encoding).
pub fn split(ct: &[u8]) -> Option<(u32, &[u8])> {
    let rest = ct.strip_prefix(&MAGIC[..])?;
    let (version, inner) = rest.split_first_chunk::<4>()?;
    let version = u32::from_be_bytes(*version);
    (version >= 2).then_some((version, inner))
}

/// The (version, ciphertext) readings of `ct` to try, in order: the envelope's, then the
/// whole input as version 1 (a `kes` ciphertext can look like an envelope by chance).
pub fn readings(ct: &[u8]) -> impl Iterator<Item = (u32, &[u8])> {
    split(ct).into_iter().chain(std::iter::once((1, ct)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn version_one_is_the_bare_format() {
        assert_eq!(wrap(1, vec![1, 2, 3]), vec![1, 2, 3]);
        assert_eq!(split(&[b'k', 1, 1, 0, 0, 0]), None);
        let v: Vec<_> = readings(b"abc").collect();
        assert_eq!(v, vec![(1, &b"abc"[..])]);
    }

    #[test]
    fn envelope_round_trip() {
        let ct = wrap(7, b"inner".to_vec());
        assert_eq!(&ct[..6], &[b'k', 2, 0, 0, 0, 7]);
        assert_eq!(split(&ct), Some((7, &b"inner"[..])));
        let v: Vec<_> = readings(&ct).collect();
        assert_eq!(v, vec![(7, &b"inner"[..]), (1, &ct[..])]);
        // Versions 0 and 1 have no envelope encoding; short headers are no envelope.
        assert_eq!(split(&[b'k', 2, 0, 0, 0, 1, 9]), None);
        assert_eq!(split(&[b'k', 2, 0, 0]), None);
    }

    /// docs/FORMAT.md §8's vectors, computed independently with Python `cryptography`.
    #[test]
    fn format_vectors_of_version_two() {
        use base64::Engine;
        let b64 = |s: &str| base64::engine::general_purpose::STANDARD.decode(s).unwrap();
        let key2: [u8; 32] = std::array::from_fn(|i| 0x80 + i as u8);
        let ctx = br#"{"bucket":"bucket/object"}"#;
        let pt: [u8; 32] = std::array::from_fn(|i| 0x40 + i as u8);
        let iv: [u8; 12] = std::array::from_fn(|i| 0xa0 + i as u8);
        let gcm = wrap(
            2,
            crate::crypto::native::seal_gcm_soft(&key2, &iv, &pt, ctx),
        );
        assert_eq!(gcm, b64("awIAAAACawEBoKGio6SlpqeoqaqrQE4ycxjl1Xc2Jkz9yEzEyf17VOJ73dR6mPncYFyLj4PpqyvXEQ1BGRXUmO59CouK"));
        let kwp = wrap(2, crate::crypto::native::seal_kwp_soft(&key2, &pt, ctx));
        assert_eq!(kwp, b64("awIAAAACawECAMrS9OqBRRF+JD01IXLYCtODzJSFS/A0sxPeAUuEOK8+nz7tlRlrASyoDTQc9IX0Xvp7K/GeeNeDXP+NPvq1G9LUgCBKUL/BtA=="));
        let kiv: [u8; 16] = std::array::from_fn(|i| 0xb0 + i as u8);
        let nonce: [u8; 12] = std::array::from_fn(|i| 0xc0 + i as u8);
        let alg = crate::crypto::kes::Algorithm::Aes256;
        let derived = crate::crypto::kes::derive_soft(alg, &key2, &kiv);
        let kes = wrap(
            2,
            crate::crypto::kes::seal(alg, &derived, &kiv, &nonce, &pt, ctx),
        );
        assert_eq!(kes, b64("awIAAAAC1VFW+QHA5covOxtPw8cKRzLI4G6bFXWzocpjxB2ZcxT7+Xf7ctk2KHFrmw30DN1asLGys7S1tre4ubq7vL2+v8DBwsPExcbHyMnKyw=="));
        for ct in [&gcm, &kwp, &kes] {
            assert_eq!(split(ct).map(|(v, _)| v), Some(2));
        }
    }
}
