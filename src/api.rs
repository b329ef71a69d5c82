//! Wire DTOs of the KES API (docs/api.md), shared by the server and [`crate::client`].
//!
//! Encoding follows Go's `encoding/json` as the reference uses it: bytes are standard padded
//! base64, timestamps RFC 3339 with trimmed nanoseconds, `<`, `>`, `&` escaped, a trailing
//! newline. Request decoding ignores unknown fields, matches field names case-insensitively
//! (last duplicate wins) and reads only the first JSON value. No logic lives here.

use std::collections::BTreeMap;
use std::fmt;

use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig};
use base64::Engine as _;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;
use zeroize::Zeroizing;

/// Go's `base64.StdEncoding` when decoding JSON `[]byte`: padding required, trailing bits
/// tolerated.
const GO_STD: GeneralPurpose = GeneralPurpose::new(
    &base64::alphabet::STANDARD,
    GeneralPurposeConfig::new()
        .with_decode_allow_trailing_bits(true)
        .with_decode_padding_mode(DecodePaddingMode::RequireCanonical),
);

fn decode_b64(s: &str) -> Result<Vec<u8>, base64::DecodeError> {
    // Go's decoder skips CR and LF anywhere in the input.
    if s.contains(['\r', '\n']) {
        let cleaned: String = s.chars().filter(|c| *c != '\r' && *c != '\n').collect();
        GO_STD.decode(cleaned)
    } else {
        GO_STD.decode(s)
    }
}

fn encode_b64(b: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(b)
}

/// Bytes as a base64 JSON string; `null` or absent is empty.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Bytes(pub Vec<u8>);

impl Serialize for Bytes {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&encode_b64(&self.0))
    }
}

impl<'de> Deserialize<'de> for Bytes {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = Option::<String>::deserialize(d)?;
        match s {
            None => Ok(Bytes(Vec::new())),
            Some(s) => decode_b64(&s).map(Bytes).map_err(serde::de::Error::custom),
        }
    }
}

/// Secret bytes (plaintexts, DEKs, imported keys) as base64: zeroized on drop, redacted in
/// `Debug`.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct SecretBytes(pub Zeroizing<Vec<u8>>);

impl fmt::Debug for SecretBytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SecretBytes(<redacted {} bytes>)", self.0.len())
    }
}

impl Serialize for SecretBytes {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let text = Zeroizing::new(encode_b64(&self.0));
        s.serialize_str(&text)
    }
}

impl<'de> Deserialize<'de> for SecretBytes {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = Option::<String>::deserialize(d)?.map(Zeroizing::new);
        match s {
            None => Ok(SecretBytes::default()),
            Some(s) => decode_b64(&s)
                .map(|v| SecretBytes(Zeroizing::new(v)))
                .map_err(serde::de::Error::custom),
        }
    }
}

/// RFC 3339 timestamps the way Go prints `time.Time` (nanoseconds, trailing zeros trimmed).
pub mod rfc3339 {
    use super::*;

    /// `t` in RFC 3339 with the fraction's trailing zeros trimmed, as Go prints it.
    pub fn format(t: &OffsetDateTime) -> String {
        // Formatting a valid OffsetDateTime as RFC 3339 only fails for years outside 0..=9999.
        t.format(&Rfc3339)
            .unwrap_or_else(|_| "0001-01-01T00:00:00Z".to_owned())
    }

    /// Serializes with [`format()`].
    pub fn serialize<S: Serializer>(t: &OffsetDateTime, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&format(t))
    }

    /// Parses RFC 3339; `null` is the zero time.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<OffsetDateTime, D::Error> {
        let s = Option::<String>::deserialize(d)?;
        match s {
            None => Ok(zero()),
            Some(s) => OffsetDateTime::parse(&s, &Rfc3339).map_err(serde::de::Error::custom),
        }
    }

    /// Go's zero `time.Time`, `0001-01-01T00:00:00Z`.
    pub fn zero() -> OffsetDateTime {
        // Invariant: year 1, January 1 is a valid date.
        #[allow(clippy::unwrap_used)]
        time::Date::from_calendar_date(1, time::Month::January, 1)
            .unwrap()
            .midnight()
            .assume_utc()
    }
}

fn zero_time() -> OffsetDateTime {
    rfc3339::zero()
}

fn is_false(b: &bool) -> bool {
    !*b
}

/// A request body that could not be decoded (bad JSON, bad base64, wrong types).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid request body: {0}")]
pub struct DecodeError(pub String);

/// Decodes a request body like Go's `json.Decoder.Decode` into a struct: the first JSON value
/// only, `null` means all defaults, unknown fields ignored, field names matched
/// case-insensitively (the DTOs use lowercase names), the last duplicate winning.
pub fn decode_request<T: DeserializeOwned + Default>(body: &[u8]) -> Result<T, DecodeError> {
    let mut values = serde_json::Deserializer::from_slice(body).into_iter::<TopLevel>();
    let value = match values.next() {
        Some(Ok(v)) => v,
        Some(Err(e)) => return Err(DecodeError(e.to_string())),
        None => return Err(DecodeError("empty body".into())),
    };
    match value {
        TopLevel::Object(fields) => {
            // Document order, so a later duplicate (in any letter case) replaces an earlier one.
            let mut lowered = serde_json::Map::with_capacity(fields.len());
            for (k, v) in fields {
                lowered.insert(k.to_lowercase(), v);
            }
            serde_json::from_value(serde_json::Value::Object(lowered))
                .map_err(|e| DecodeError(e.to_string()))
        }
        TopLevel::Other(serde_json::Value::Null) => Ok(T::default()),
        TopLevel::Other(other) => Err(DecodeError(format!(
            "cannot decode JSON {} into an object",
            kind(&other)
        ))),
    }
}

/// A top-level JSON value whose object members keep their document order.
enum TopLevel {
    Object(Vec<(String, serde_json::Value)>),
    Other(serde_json::Value),
}

impl<'de> Deserialize<'de> for TopLevel {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = TopLevel;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a JSON value")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<TopLevel, A::Error> {
                let mut fields = Vec::new();
                while let Some((k, v)) = map.next_entry::<String, serde_json::Value>()? {
                    fields.push((k, v));
                }
                Ok(TopLevel::Object(fields))
            }
            fn visit_unit<E: serde::de::Error>(self) -> Result<TopLevel, E> {
                Ok(TopLevel::Other(serde_json::Value::Null))
            }
            fn visit_bool<E: serde::de::Error>(self, v: bool) -> Result<TopLevel, E> {
                Ok(TopLevel::Other(serde_json::Value::Bool(v)))
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<TopLevel, E> {
                Ok(TopLevel::Other(v.into()))
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<TopLevel, E> {
                Ok(TopLevel::Other(v.into()))
            }
            fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<TopLevel, E> {
                Ok(TopLevel::Other(v.into()))
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<TopLevel, E> {
                Ok(TopLevel::Other(v.into()))
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> Result<TopLevel, A::Error> {
                while seq.next_element::<serde::de::IgnoredAny>()?.is_some() {}
                Ok(TopLevel::Other(serde_json::Value::Array(Vec::new())))
            }
        }
        d.deserialize_any(V)
    }
}

fn kind(v: &serde_json::Value) -> &'static str {
    match v {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "bool",
        serde_json::Value::Number(_) => "number",
        serde_json::Value::String(_) => "string",
        serde_json::Value::Array(_) => "array",
        serde_json::Value::Object(_) => "object",
    }
}

/// Encodes a response body like Go's `json.Encoder`: HTML-safe escaping and a trailing `\n`.
pub fn encode_response<T: Serialize + ?Sized>(value: &T) -> Vec<u8> {
    // Serializing these DTOs cannot fail: every map key is a string and no custom serializer
    // returns an error.
    let raw = serde_json::to_vec(value).unwrap_or_default();
    let mut out = go_escape(&raw);
    out.push(b'\n');
    out
}

/// [`encode_response`] for bodies that carry key material (generate, decrypt): written into
/// one exactly-sized zeroizing buffer, so no reallocation leaves a copy behind. Their fields
/// are base64, which Go's HTML escaping never touches.
pub fn encode_secret_response<T: Serialize + ?Sized>(value: &T) -> zeroize::Zeroizing<Vec<u8>> {
    struct Count(usize);
    impl std::io::Write for Count {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0 += b.len();
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut count = Count(0);
    // As in `encode_response`: these DTOs always serialize.
    let _ = serde_json::to_writer(&mut count, value);
    let mut out = zeroize::Zeroizing::new(Vec::with_capacity(count.0 + 1));
    let _ = serde_json::to_writer(&mut *out, value);
    out.push(b'\n');
    out
}

/// Go's HTML-safe escapes. The characters can only occur inside JSON strings, so a bytewise
/// rewrite is exact.
pub fn go_escape(raw: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(raw.len() + 8);
    let mut i = 0;
    while i < raw.len() {
        match raw[i] {
            b'<' => out.extend_from_slice(b"\\u003c"),
            b'>' => out.extend_from_slice(b"\\u003e"),
            b'&' => out.extend_from_slice(b"\\u0026"),
            // U+2028 and U+2029 are E2 80 A8 / E2 80 A9 in UTF-8.
            0xe2 if raw.get(i + 1) == Some(&0x80)
                && matches!(raw.get(i + 2), Some(0xa8 | 0xa9)) =>
            {
                out.extend_from_slice(if raw[i + 2] == 0xa8 {
                    b"\\u2028"
                } else {
                    b"\\u2029"
                });
                i += 2;
            }
            b => out.push(b),
        }
        i += 1;
    }
    out
}

/// The error body `{"message":"..."\n}` byte for byte (the reference's embedded newline).
pub fn encode_error(message: &str) -> Vec<u8> {
    let msg = serde_json::to_vec(message).unwrap_or_else(|_| b"\"\"".to_vec());
    let mut out = b"{\"message\":".to_vec();
    out.extend_from_slice(&go_escape(&msg));
    out.extend_from_slice(b"\n}");
    out
}

/// What a client reads from an error body.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct ErrorResponse {
    #[serde(default)]
    /// KES's field.
    pub message: String,
    #[serde(default)]
    /// The alternative field kms-go also reads; it wins when not empty.
    pub error: String,
}

// ---- requests ----

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
/// `/v1/key/import` body.
pub struct ImportKeyRequest {
    #[serde(default)]
    /// The key material.
    pub key: SecretBytes,
    #[serde(default)]
    /// Its cipher: `AES256` or `ChaCha20` (or their long names).
    pub cipher: String,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
/// `/v1/key/generate` body.
pub struct GenerateKeyRequest {
    #[serde(default, skip_serializing_if = "Bytes::is_empty")]
    /// Associated data bound to the sealed key.
    pub context: Bytes,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
/// `/v1/key/encrypt` body.
pub struct EncryptKeyRequest {
    #[serde(default)]
    /// What to seal.
    pub plaintext: SecretBytes,
    #[serde(default, skip_serializing_if = "Bytes::is_empty")]
    /// Associated data bound to it.
    pub context: Bytes,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
/// `/v1/key/decrypt` body.
pub struct DecryptKeyRequest {
    #[serde(default)]
    /// What generate or encrypt returned.
    pub ciphertext: Bytes,
    #[serde(default, skip_serializing_if = "Bytes::is_empty")]
    /// The associated data it was sealed with.
    pub context: Bytes,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
/// `/v1/key/hmac` body.
pub struct HmacRequest {
    #[serde(default)]
    /// What to authenticate.
    pub message: SecretBytes,
}

impl Bytes {
    /// Whether there are no bytes.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

// ---- responses ----

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
/// `/version` answer.
pub struct VersionResponse {
    #[serde(default)]
    /// The server's version.
    pub version: String,
    #[serde(default)]
    /// The commit it was built from, or `<unknown>`.
    pub commit: String,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
/// `/v1/status` answer.
pub struct StatusResponse {
    /// The server's version.
    pub version: String,
    /// Go's `GOOS` name.
    pub os: String,
    /// Go's `GOARCH` name.
    pub arch: String,
    /// Seconds since start.
    pub uptime: u64,
    /// CPUs available.
    pub num_cpu: usize,
    /// CPUs the server may use.
    pub num_cpu_used: usize,
    /// Heap in use, in bytes.
    pub mem_heap_used: u64,
    /// Stack in use, in bytes.
    pub mem_stack_used: u64,
    /// Milliseconds; omitted when 0 (unreachable).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub keystore_latency: u64,
    #[serde(default, skip_serializing_if = "is_false")]
    /// The keystore's probe failed.
    pub keystore_unreachable: bool,
}

fn is_zero(v: &u64) -> bool {
    *v == 0
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
/// One `/v1/api` entry.
pub struct ApiRoute {
    /// The route's method.
    pub method: String,
    /// Its path.
    pub path: String,
    /// Its body limit in bytes.
    pub max_body: u64,
    /// Its deadline in seconds; 0: none.
    pub timeout: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
/// `/v1/key/describe` answer.
pub struct DescribeKeyResponse {
    /// The key's name.
    pub name: String,
    /// `AES256` or `ChaCha20`.
    pub algorithm: String,
    #[serde(with = "rfc3339", default = "zero_time")]
    /// When it was created.
    pub created_at: OffsetDateTime,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    /// Who created it; omitted when unknown.
    pub created_by: String,
    /// kesh's extension: the key version that seals (0 from servers without versions).
    #[serde(default)]
    pub version: u32,
}

/// kesh's extension: `/v1/key/rotate/<name>`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RotateKeyResponse {
    /// The key.
    pub name: String,
    /// The version just made, which seals from now on.
    pub version: u32,
}

/// kesh's extension: one entry of `/v1/key/versions/<name>`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyVersion {
    /// The version's number, from 1.
    pub version: u32,
    /// When the version was made.
    #[serde(with = "rfc3339", default = "zero_time")]
    pub created_at: OffsetDateTime,
    /// `sealing` (the newest) or `active` (unseals only).
    pub state: String,
    /// Seals and unseals with this version by the answering server since it started.
    pub seals: u64,
    /// Unseals, likewise.
    pub unseals: u64,
    /// RFC 3339; absent when the answering server has not used the version since it started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_used: Option<String>,
}

/// kesh's extension: `/v1/key/versions/<name>`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyVersionsResponse {
    /// The key.
    pub name: String,
    /// Its versions, oldest first.
    pub versions: Vec<KeyVersion>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
/// `/v1/key/list` answer.
pub struct ListKeysResponse {
    #[serde(default)]
    /// The matching names, sorted.
    pub names: Vec<String>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    /// Always empty from kesh: every match is in one answer.
    pub continue_at: String,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
/// `/v1/key/generate` answer.
pub struct GenerateKeyResponse {
    /// The data key.
    pub plaintext: SecretBytes,
    /// The data key sealed under the master key.
    pub ciphertext: Bytes,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
/// `/v1/key/encrypt` answer.
pub struct EncryptKeyResponse {
    /// The sealed plaintext.
    pub ciphertext: Bytes,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
/// `/v1/key/decrypt` answer.
pub struct DecryptKeyResponse {
    /// The opened plaintext.
    pub plaintext: SecretBytes,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
/// `/v1/key/hmac` answer.
pub struct HmacResponse {
    /// HMAC-SHA256 of the message.
    pub hmac: Bytes,
}

/// `allow`/`deny` as JSON objects mapping each pattern to `{}`.
pub type PatternSet = BTreeMap<String, Empty>;

/// The JSON value `{}`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Empty {}

#[derive(Debug, Clone, Serialize, Deserialize)]
/// `/v1/policy/describe` answer.
pub struct DescribePolicyResponse {
    /// The policy's name.
    pub name: String,
    #[serde(with = "rfc3339", default = "zero_time")]
    /// When the config was loaded.
    pub created_at: OffsetDateTime,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    /// The admin identity.
    pub created_by: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
/// `/v1/policy/read` answer.
pub struct ReadPolicyResponse {
    /// The policy's name.
    pub name: String,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    /// Allowed path patterns.
    pub allow: PatternSet,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    /// Denied path patterns.
    pub deny: PatternSet,
    #[serde(with = "rfc3339", default = "zero_time")]
    /// When the config was loaded.
    pub created_at: OffsetDateTime,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    /// The admin identity.
    pub created_by: String,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
/// `/v1/policy/list` answer.
pub struct ListPoliciesResponse {
    #[serde(default)]
    /// The matching names, sorted.
    pub names: Vec<String>,
    #[serde(default)]
    /// Always empty from kesh.
    pub continue_at: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
/// `/v1/identity/describe` answer.
pub struct DescribeIdentityResponse {
    #[serde(default, skip_serializing_if = "is_false")]
    /// Whether it is the admin.
    pub admin: bool,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    /// Its policy; empty for the admin.
    pub policy: String,
    #[serde(with = "rfc3339", default = "zero_time")]
    /// When the config was loaded.
    pub created_at: OffsetDateTime,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    /// The admin, for identities with a policy.
    pub created_by: String,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
/// `/v1/identity/list` answer.
pub struct ListIdentitiesResponse {
    #[serde(default)]
    /// The matching identities, sorted.
    pub identities: Vec<String>,
    #[serde(default)]
    /// Always empty from kesh.
    pub continue_at: String,
}

/// Self-describe in the shape kms-go's `DescribeSelf` decodes (a deliberate deviation,
/// README.md "Deviations from KES").
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SelfDescribeResponse {
    /// The caller's identity.
    pub identity: String,
    #[serde(default, skip_serializing_if = "is_false")]
    /// Whether the caller is the admin.
    pub admin: bool,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    /// Its policy's name.
    pub policy: String,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    /// Its policy's allowed patterns.
    pub allow: PatternSet,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    /// Its policy's denied patterns.
    pub deny: PatternSet,
    #[serde(with = "rfc3339", default = "zero_time")]
    /// When the config was loaded.
    pub created_at: OffsetDateTime,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    /// The admin, for callers with a policy.
    pub created_by: String,
}

/// One `/v1/log/audit` line.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AuditEvent {
    #[serde(with = "rfc3339")]
    /// When the request finished.
    pub time: OffsetDateTime,
    /// What was asked.
    pub request: AuditRequest,
    /// What was answered.
    pub response: AuditResponse,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
/// The request half of an audit line.
pub struct AuditRequest {
    #[serde(default, skip_serializing_if = "String::is_empty")]
    /// The client's address.
    pub ip: String,
    /// The decoded path.
    pub path: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    /// The client's identity, if any.
    pub identity: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
/// The response half of an audit line.
pub struct AuditResponse {
    /// The status code.
    pub code: u16,
    /// Milliseconds (the reference's unit, whatever its comment says).
    pub time: u64,
}

/// One `/v1/log/error` line.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ErrorEvent {
    /// The error, as the error log wrote it.
    pub message: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_decode_like_go() {
        let r: GenerateKeyRequest =
            decode_request(br#"{"Context":"e30=","CONTEXT":"AAEC","x":1} trailing"#).unwrap();
        assert_eq!(r.context.0, vec![0, 1, 2]);
        let r: GenerateKeyRequest = decode_request(b"null").unwrap();
        assert!(r.context.is_empty());
        let r: DecryptKeyRequest =
            decode_request(b"{\"ciphertext\":\"AA\\r\\nEC\",\"context\":null}").unwrap();
        assert_eq!(r.ciphertext.0, vec![0, 1, 2]);
        assert!(decode_request::<GenerateKeyRequest>(br#"{"context":"AAE"}"#).is_err());
        assert!(decode_request::<GenerateKeyRequest>(br#"{"context":"AA-_"}"#).is_err());
        assert!(decode_request::<GenerateKeyRequest>(b"").is_err());
        assert!(decode_request::<GenerateKeyRequest>(b"[1]").is_err());
        assert!(decode_request::<GenerateKeyRequest>(br#"{"context":5}"#).is_err());
    }

    #[test]
    fn responses_encode_like_go() {
        assert_eq!(
            encode_error("key already exists"),
            b"{\"message\":\"key already exists\"\n}"
        );
        assert_eq!(
            encode_error("a<b>&"),
            b"{\"message\":\"a\\u003cb\\u003e\\u0026\"\n}"
        );
        let t = OffsetDateTime::from_unix_timestamp_nanos(1_700_000_000_120_000_000).unwrap();
        let body = encode_response(&DescribePolicyResponse {
            name: "p".into(),
            created_at: t,
            created_by: String::new(),
        });
        assert_eq!(
            body,
            b"{\"name\":\"p\",\"created_at\":\"2023-11-14T22:13:20.12Z\"}\n"
        );
        assert_eq!(rfc3339::format(&rfc3339::zero()), "0001-01-01T00:00:00Z");
        let dbg = format!(
            "{:?}",
            DecryptKeyResponse {
                plaintext: SecretBytes(Zeroizing::new(vec![7; 4]))
            }
        );
        assert!(!dbg.contains('7'), "{dbg}");
    }
}
