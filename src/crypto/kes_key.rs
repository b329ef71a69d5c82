//! KES's stored key value, as its `fs` keystore writes one file per key (KES:
//! `internal/crypto/key.go` `EncodeKeyVersion` and `internal/protobuf/crypto.proto` at
//! github.com/minio/kes).
//!
//! ```text
//! current: base64(protobuf miniohq.kms.KeyVersion)
//!   1 Key       SecretKey { 1 key: bytes(32), 2 type: uint32 (1 = AES256, 2 = ChaCha20) }
//!   2 HMACKey   HMACKey   { 1 key: bytes(32), 2 hash: uint32 (1 = SHA256) }
//!   3 CreatedAt google.protobuf.Timestamp { 1 seconds: int64, 2 nanos: int32 }
//!   4 CreatedBy string
//! legacy:  JSON {"bytes": b64(32), "algorithm": "" | "AES256" | ..., "created_at", "created_by"}
//! ```
//! The protobuf is decoded by hand: four fields and two small nested messages do not justify a
//! code generator. Unknown fields are skipped, as protobuf requires. Pure parsing: the caller
//! reads the file. Errors never carry key bytes.

use base64::Engine;
use time::OffsetDateTime;

use super::kes::Algorithm;
use crate::secret::Key32;

/// A KES key as stored: the master key, its HMAC key (none for legacy JSON values) and
/// provenance.
pub struct StoredKey {
    /// The key material.
    pub key: Key32,
    /// Its algorithm.
    pub algorithm: Algorithm,
    /// Its HMAC key; legacy values have none.
    pub hmac: Option<Key32>,
    /// `0001-01-01T00:00:00Z` when the value has none, as KES reports it.
    pub created_at: OffsetDateTime,
    /// Empty when unknown.
    pub created_by: String,
    /// Which of the two formats the value was in.
    pub format: Format,
}

impl std::fmt::Debug for StoredKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoredKey")
            .field("algorithm", &self.algorithm)
            .field("has_hmac", &self.hmac.is_some())
            .field("created_at", &self.created_at)
            .field("created_by", &self.created_by)
            .field("format", &self.format)
            .finish_non_exhaustive()
    }
}

/// Which of KES's encodings a stored key value used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// base64 protobuf `KeyVersion` (KES since 2024).
    Protobuf,
    /// JSON `{"bytes", "algorithm", ...}` (older KES); no HMAC key.
    LegacyJson,
}

/// Why a stored value could not be read. Never includes key material.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid KES key value: {0}")]
pub struct KeyFormatError(pub String);

fn err(msg: impl Into<String>) -> KeyFormatError {
    KeyFormatError(msg.into())
}

/// The time KES reports for keys without one.
pub fn zero_time() -> OffsetDateTime {
    time::macros::datetime!(0001-01-01 00:00 UTC)
}

/// Parses a stored value in either format (JSON is tried first, as KES does).
pub fn parse(value: &[u8]) -> Result<StoredKey, KeyFormatError> {
    let trimmed = value.trim_ascii();
    if serde_json::from_slice::<serde::de::IgnoredAny>(trimmed).is_ok() {
        return parse_legacy_json(trimmed);
    }
    let raw = zeroize::Zeroizing::new(
        base64::engine::general_purpose::STANDARD
            .decode(trimmed)
            .map_err(|_| err("neither JSON nor base64"))?,
    );
    parse_protobuf(&raw)
}

#[derive(serde::Deserialize)]
struct LegacyJson {
    #[serde(default)]
    bytes: Option<String>,
    #[serde(default)]
    algorithm: String,
    #[serde(default)]
    created_at: Option<String>,
    #[serde(default)]
    created_by: String,
}

impl Drop for LegacyJson {
    fn drop(&mut self) {
        use zeroize::Zeroize;
        if let Some(b) = &mut self.bytes {
            b.zeroize();
        }
    }
}

fn parse_legacy_json(value: &[u8]) -> Result<StoredKey, KeyFormatError> {
    let v: LegacyJson = serde_json::from_slice(value)
        .map_err(|e| err(format!("legacy JSON value: {}", e.classify_name())))?;
    let b64 = v
        .bytes
        .as_deref()
        .ok_or_else(|| err("legacy JSON value without `bytes`"))?;
    let bytes = zeroize::Zeroizing::new(
        base64::engine::general_purpose::STANDARD
            .decode(b64)
            .map_err(|_| err("legacy JSON `bytes` is not base64"))?,
    );
    let key = key32(&bytes, "legacy JSON `bytes`")?;
    let algorithm = match v.algorithm.as_str() {
        "" => Algorithm::Aes256,
        other => Algorithm::from_import_name(other)
            .ok_or_else(|| err(format!("unknown algorithm '{other}'")))?,
    };
    let created_at = match v.created_at.as_deref() {
        None | Some("") => zero_time(),
        Some(s) => OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339)
            .map_err(|_| err(format!("created_at '{s}' is not RFC 3339")))?,
    };
    Ok(StoredKey {
        key,
        algorithm,
        hmac: None,
        created_at,
        created_by: v.created_by.clone(),
        format: Format::LegacyJson,
    })
}

trait ClassifyName {
    fn classify_name(&self) -> &'static str;
}

impl ClassifyName for serde_json::Error {
    /// The error class only: serde's messages can quote the offending input.
    fn classify_name(&self) -> &'static str {
        match self.classify() {
            serde_json::error::Category::Io => "I/O error",
            serde_json::error::Category::Syntax => "syntax error",
            serde_json::error::Category::Data => "unexpected field type",
            serde_json::error::Category::Eof => "truncated",
        }
    }
}

fn key32(bytes: &[u8], what: &str) -> Result<Key32, KeyFormatError> {
    if bytes.len() != 32 {
        return Err(err(format!("{what} is {} bytes, expected 32", bytes.len())));
    }
    let mut k = zeroize::Zeroizing::new([0u8; 32]);
    k.copy_from_slice(bytes);
    Ok(k)
}

/// One protobuf field: number and value.
enum Field<'a> {
    Varint(u32, u64),
    Bytes(u32, &'a [u8]),
}

/// A minimal protobuf reader: varints and length-delimited fields; fixed32/64 skipped.
struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    fn varint(&mut self) -> Result<u64, KeyFormatError> {
        let mut out = 0u64;
        for i in 0..10 {
            let (&b, rest) = self
                .buf
                .split_first()
                .ok_or_else(|| err("truncated protobuf varint"))?;
            self.buf = rest;
            out |= u64::from(b & 0x7f) << (7 * i);
            if b & 0x80 == 0 {
                return Ok(out);
            }
        }
        Err(err("protobuf varint longer than 10 bytes"))
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], KeyFormatError> {
        if self.buf.len() < n {
            return Err(err("truncated protobuf field"));
        }
        let (head, rest) = self.buf.split_at(n);
        self.buf = rest;
        Ok(head)
    }

    /// The next field we understand; `None` at the end.
    fn next(&mut self) -> Result<Option<Field<'a>>, KeyFormatError> {
        while !self.buf.is_empty() {
            let tag = self.varint()?;
            let number = u32::try_from(tag >> 3).map_err(|_| err("protobuf field number"))?;
            if number == 0 {
                return Err(err("protobuf field number 0"));
            }
            match tag & 7 {
                0 => return Ok(Some(Field::Varint(number, self.varint()?))),
                1 => {
                    self.take(8)?;
                }
                2 => {
                    let len = usize::try_from(self.varint()?)
                        .map_err(|_| err("protobuf length too large"))?;
                    return Ok(Some(Field::Bytes(number, self.take(len)?)));
                }
                5 => {
                    self.take(4)?;
                }
                w => return Err(err(format!("unsupported protobuf wire type {w}"))),
            }
        }
        Ok(None)
    }
}

/// `{1: bytes key, 2: uint32 type}`, the shape of both SecretKey and HMACKey.
fn key_message(buf: &[u8], what: &str) -> Result<(Key32, u64), KeyFormatError> {
    let mut r = Reader { buf };
    let (mut key, mut kind) = (None, 0u64);
    while let Some(f) = r.next()? {
        match f {
            Field::Bytes(1, b) => key = Some(key32(b, what)?),
            Field::Varint(2, v) => kind = v,
            Field::Bytes(n, _) | Field::Varint(n, _) if n <= 2 => {
                return Err(err(format!("{what}: field {n} has the wrong wire type")))
            }
            _ => {}
        }
    }
    Ok((key.ok_or_else(|| err(format!("{what} missing")))?, kind))
}

fn timestamp(buf: &[u8]) -> Result<OffsetDateTime, KeyFormatError> {
    let mut r = Reader { buf };
    let (mut secs, mut nanos) = (0i64, 0i64);
    while let Some(f) = r.next()? {
        match f {
            // int64/int32 are two's complement in a varint.
            Field::Varint(1, v) => secs = v as i64,
            Field::Varint(2, v) => nanos = i64::from(v as i32),
            _ => {}
        }
    }
    if !(0..1_000_000_000).contains(&nanos) {
        return Err(err("created_at nanos out of range"));
    }
    OffsetDateTime::from_unix_timestamp_nanos(i128::from(secs) * 1_000_000_000 + i128::from(nanos))
        .map_err(|_| err("created_at out of range"))
}

fn parse_protobuf(buf: &[u8]) -> Result<StoredKey, KeyFormatError> {
    let mut r = Reader { buf };
    let (mut key, mut hmac, mut created_at, mut created_by) = (None, None, None, String::new());
    while let Some(f) = r.next()? {
        match f {
            Field::Bytes(1, b) => {
                let (k, t) = key_message(b, "secret key")?;
                let alg = match t {
                    1 => Algorithm::Aes256,
                    2 => Algorithm::ChaCha20,
                    other => return Err(err(format!("unknown secret key type {other}"))),
                };
                key = Some((k, alg));
            }
            Field::Bytes(2, b) => {
                let (k, hash) = key_message(b, "HMAC key")?;
                if hash != 1 {
                    return Err(err(format!("unknown HMAC hash {hash}")));
                }
                hmac = Some(k);
            }
            Field::Bytes(3, b) => created_at = Some(timestamp(b)?),
            Field::Bytes(4, b) => {
                created_by =
                    String::from_utf8(b.to_vec()).map_err(|_| err("created_by is not UTF-8"))?;
            }
            Field::Varint(n, _) if (1..=4).contains(&n) => {
                return Err(err(format!("field {n} has the wrong wire type")))
            }
            _ => {}
        }
    }
    let (key, algorithm) = key.ok_or_else(|| err("no secret key (field 1)"))?;
    Ok(StoredKey {
        key,
        algorithm,
        hmac,
        created_at: created_at.unwrap_or_else(zero_time),
        created_by,
        format: Format::Protobuf,
    })
}

/// Encodes a value the way KES writes it (for tests and tools that make KES key files).
pub fn encode(
    key: &[u8; 32],
    algorithm: Algorithm,
    hmac: &[u8; 32],
    created_at: OffsetDateTime,
    created_by: &str,
) -> String {
    fn varint(out: &mut Vec<u8>, mut v: u64) {
        while v >= 0x80 {
            out.push((v as u8) | 0x80);
            v >>= 7;
        }
        out.push(v as u8);
    }
    fn field(out: &mut Vec<u8>, number: u64, bytes: &[u8]) {
        varint(out, number << 3 | 2);
        varint(out, bytes.len() as u64);
        out.extend_from_slice(bytes);
    }
    fn key_msg(key: &[u8; 32], kind: u64) -> zeroize::Zeroizing<Vec<u8>> {
        let mut m = zeroize::Zeroizing::new(Vec::with_capacity(36));
        field(&mut m, 1, key);
        varint(&mut m, 2 << 3);
        varint(&mut m, kind);
        m
    }
    let mut out = zeroize::Zeroizing::new(Vec::new());
    let kind = match algorithm {
        Algorithm::Aes256 => 1,
        Algorithm::ChaCha20 => 2,
    };
    field(&mut out, 1, &key_msg(key, kind));
    field(&mut out, 2, &key_msg(hmac, 1));
    let mut ts = Vec::new();
    let secs = created_at.unix_timestamp();
    if secs != 0 {
        varint(&mut ts, 1 << 3);
        varint(&mut ts, secs as u64);
    }
    if created_at.nanosecond() != 0 {
        varint(&mut ts, 2 << 3);
        varint(&mut ts, u64::from(created_at.nanosecond()));
    }
    field(&mut out, 3, &ts);
    if !created_by.is_empty() {
        field(&mut out, 4, created_by.as_bytes());
    }
    base64::engine::general_purpose::STANDARD.encode(out.as_slice())
}

#[cfg(test)]
mod tests {
    use super::*;

    const VECTOR: &str = "CiQKIMiHG7XrN94FuwblJJor4f7f6rbqAl7DwsLaiIoyz0D2EAESJAognLXl4yqa4cjZTcSbsU6sNnN8kP9ARWkXwa20YQZa9HgQARoMCNithK0GEID67qYDIkAzZWNmY2RmMzhmY2JlMTQxYWUyNmExMDMwZjgxZTk2Yjc1MzM2NWE0Njc2MGFlNmI1Nzg2OThhOTdjNTlmZDIy";

    fn b64(s: &str) -> Vec<u8> {
        base64::engine::general_purpose::STANDARD.decode(s).unwrap()
    }

    #[test]
    fn kes_test_vector() {
        let k = parse(VECTOR.as_bytes()).unwrap();
        assert_eq!(k.format, Format::Protobuf);
        assert_eq!(k.algorithm, Algorithm::Aes256);
        assert_eq!(
            k.key.to_vec(),
            b64("yIcbtes33gW7BuUkmivh/t/qtuoCXsPCwtqIijLPQPY=")
        );
        assert_eq!(
            k.hmac.as_ref().unwrap().to_vec(),
            b64("nLXl4yqa4cjZTcSbsU6sNnN8kP9ARWkXwa20YQZa9Hg=")
        );
        assert_eq!(
            k.created_at,
            time::macros::datetime!(2024-01-12 10:39:20.886816 UTC)
        );
        assert_eq!(
            k.created_by,
            "3ecfcdf38fcbe141ae26a1030f81e96b753365a46760ae6b578698a97c59fd22"
        );
        // Our encoder writes the same bytes KES wrote.
        let again = encode(
            &k.key,
            k.algorithm,
            k.hmac.as_ref().unwrap(),
            k.created_at,
            &k.created_by,
        );
        assert_eq!(again, VECTOR);
        // A trailing newline (an editor's) is tolerated.
        assert!(parse(format!("{VECTOR}\n").as_bytes()).is_ok());
        let dbg = format!("{k:?}");
        assert!(!dbg.contains("200"), "{dbg}");
    }

    #[test]
    fn chacha20_and_unknown_fields() {
        let created = time::macros::datetime!(1969-12-31 23:59:59.5 UTC);
        let text = encode(&[9; 32], Algorithm::ChaCha20, &[8; 32], created, "");
        let mut raw = b64(&text);
        // Fields a newer KES might add (varint 5, fixed64 6, bytes 7, fixed32 8) are skipped.
        raw.extend_from_slice(&[5 << 3, 0x96, 0x01]);
        raw.extend_from_slice(&[6 << 3 | 1, 1, 2, 3, 4, 5, 6, 7, 8]);
        raw.extend_from_slice(&[7 << 3 | 2, 2, 0xff, 0xfe]);
        raw.extend_from_slice(&[8 << 3 | 5, 1, 2, 3, 4]);
        let k = parse(b64e(&raw).as_bytes()).unwrap();
        assert_eq!(k.algorithm, Algorithm::ChaCha20);
        assert_eq!(*k.key, [9; 32]);
        assert_eq!(*k.hmac.unwrap(), [8; 32]);
        assert_eq!(k.created_at, created);
        assert_eq!(k.created_by, "");
        // Type 3 is no cipher KES knows.
        let mut bad = b64(&text);
        let pos = bad.windows(2).position(|w| w == [0x10, 0x02]).unwrap();
        bad[pos + 1] = 3;
        let e = parse(b64e(&bad).as_bytes()).unwrap_err();
        assert!(e.to_string().contains("unknown secret key type 3"), "{e}");
    }

    fn b64e(b: &[u8]) -> String {
        base64::engine::general_purpose::STANDARD.encode(b)
    }

    #[test]
    fn legacy_json() {
        let v = br#"{"bytes":"yIcbtes33gW7BuUkmivh/t/qtuoCXsPCwtqIijLPQPY=","algorithm":"AES256-GCM_SHA256","created_at":"2020-01-02T03:04:05.5Z","created_by":"abc"}"#;
        let k = parse(v).unwrap();
        assert_eq!(k.format, Format::LegacyJson);
        assert!(k.hmac.is_none());
        assert_eq!(k.algorithm, Algorithm::Aes256);
        assert_eq!(k.created_by, "abc");
        assert_eq!(
            k.created_at,
            time::macros::datetime!(2020-01-02 03:04:05.5 UTC)
        );
        let k = parse(br#"{"bytes":"yIcbtes33gW7BuUkmivh/t/qtuoCXsPCwtqIijLPQPY=","algorithm":"","version":"v1"}"#).unwrap();
        assert_eq!(k.algorithm, Algorithm::Aes256);
        assert_eq!(k.created_at, zero_time());
        let k = parse(br#"{"bytes":"yIcbtes33gW7BuUkmivh/t/qtuoCXsPCwtqIijLPQPY=","algorithm":"XCHACHA20-POLY1305"}"#).unwrap();
        assert_eq!(k.algorithm, Algorithm::ChaCha20);
    }

    #[test]
    fn corrupt_values_are_errors_without_key_bytes() {
        for bad in [
            &b""[..],
            b"not base64 !",
            b"{\"bytes\":\"AAAA\"}",
            b"{\"bytes\":\"yIcbtes33gW7BuUkmivh/t/qtuoCXsPCwtqIijLPQPY=\",\"algorithm\":\"DES\"}",
            b"{}",
            b"CiQKIMiHG7XrN94F",
            b"AAAA",
        ] {
            let e = parse(bad).unwrap_err();
            assert!(!e.to_string().contains("yIcb"), "{e}");
        }
        // Truncating the vector anywhere never panics.
        let raw = b64(VECTOR);
        for n in 0..raw.len() {
            let _ = parse_protobuf(&raw[..n]);
        }
    }
}
