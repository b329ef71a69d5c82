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
}
