//! The server part of the config file (hsm-config/kesh.yaml documents
//! every key; KES: `kesconf/config.go` at github.com/minio/kes): address, admin, tls, policy, cache,
//! api, log, keys — and `keystore:`, handed to [`super::keystore`].
//!
//! The file is read as YAML, `${VAR}` references are substituted ([`super::env`]), then each
//! section is validated into a [`ServerConfig`]. Because substituted values are strings, every
//! bool, number and duration is accepted as a string too. Unknown keys are ignored, as in KES.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_yaml::{Mapping, Value};
use time::OffsetDateTime;

use super::keystore::KeystoreConfig;
use super::{parse_bool, ConfigError};
use crate::identity::Identity;
use crate::name::KeyName;
use crate::server::policy::{Authorizer, Policy, PolicyEntry, PolicyName};

/// The default listen address of `kesh server`.
pub const DEFAULT_ADDRESS: &str = "0.0.0.0:7373";

/// A validated server configuration.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// `address:`; `--addr` overrides it.
    pub address: Option<SocketAddr>,
    /// `admin.identity:`; a non-hash value disables admin access.
    pub admin: Identity,
    /// `tls:`.
    pub tls: TlsConfig,
    /// `policy:`: each policy with the identities assigned to it.
    pub policies: BTreeMap<PolicyName, PolicyEntry>,
    /// `cache:` (validated, unused).
    pub cache: CacheConfig,
    /// `api:` entries by route path, verbatim.
    pub api: BTreeMap<String, RouteOverride>,
    /// `log:`.
    pub log: LogConfig,
    /// `keys:` created at start (existing ones are fine).
    pub keys: Vec<KeyName>,
    /// `keys[].rotate_after:` (kesh's extension): a key whose newest version is older than
    /// this gets a new version ([`crate::server::rotation`]).
    pub rotate_after: BTreeMap<KeyName, std::time::Duration>,
    /// `keystore:`.
    pub keystore: KeystoreConfig,
}

/// One `api:` entry (hsm-config/kesh.yaml, `api:`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RouteOverride {
    /// `skip_auth:`: identify the caller but check no policy.
    pub skip_auth: bool,
    /// Applied only when set and non-zero.
    pub timeout: Option<Duration>,
}

/// `tls:`.
#[derive(Debug, Clone)]
pub struct TlsConfig {
    /// `tls.key:`, the server's private key.
    pub key: PathBuf,
    /// `tls.cert:`, the server's certificate chain.
    pub cert: PathBuf,
    /// `tls.auth: on`: verify client chains against `ca`.
    pub verify_client_chain: bool,
    /// `tls.ca:`, the CAs that client chains must verify against (`tls.auth: on`).
    pub ca: Option<PathBuf>,
}

/// `cache:`. kesh keeps no key cache (keys never leave the HSM); the values are validated for
/// compatibility with KES files and otherwise unused.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CacheConfig {
    /// `cache.expiry.any:`.
    pub any: Duration,
    /// `cache.expiry.unused:`.
    pub unused: Duration,
    /// `cache.expiry.offline:`.
    pub offline: Duration,
}

/// `log:` levels reduced to what kesh does with them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LogConfig {
    /// Error events are logged and streamed (level at or below ERROR).
    pub error: bool,
    /// Audit records also go to the log (level at or below INFO); `/v1/log/audit` always streams.
    pub audit: bool,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            error: true,
            audit: true,
        }
    }
}

fn err(field: impl Into<String>, msg: impl Into<String>) -> ConfigError {
    ConfigError::new(field, msg)
}

fn mapping<'a>(v: &'a Value, field: &str) -> Result<Option<&'a Mapping>, ConfigError> {
    match v {
        Value::Null => Ok(None),
        Value::Mapping(m) => Ok(Some(m)),
        _ => Err(err(field, "expected a mapping")),
    }
}

fn get<'a>(m: Option<&'a Mapping>, key: &str) -> Option<&'a Value> {
    m.and_then(|m| m.get(key)).filter(|v| !v.is_null())
}

/// A scalar as text (strings, numbers and bools alike).
fn scalar(v: &Value, field: &str) -> Result<String, ConfigError> {
    match v {
        Value::String(s) => Ok(s.clone()),
        Value::Number(n) => Ok(n.to_string()),
        Value::Bool(b) => Ok(b.to_string()),
        _ => Err(err(field, "expected a single value")),
    }
}

fn opt_string(m: Option<&Mapping>, key: &str, field: &str) -> Result<Option<String>, ConfigError> {
    get(m, key)
        .map(|v| scalar(v, field))
        .transpose()
        .map(|s| s.filter(|s| !s.trim().is_empty()))
}

fn string_list(v: Option<&Value>, field: &str) -> Result<Vec<String>, ConfigError> {
    match v {
        None => Ok(Vec::new()),
        Some(Value::Sequence(items)) => items.iter().map(|i| scalar(i, field)).collect(),
        Some(other) => Ok(vec![scalar(other, field)?]),
    }
}

fn duration(m: Option<&Mapping>, key: &str, field: &str) -> Result<Option<Duration>, ConfigError> {
    match get(m, key) {
        None => Ok(None),
        Some(v) => {
            let s = scalar(v, field)?;
            super::parse_duration(&s).map(Some).ok_or_else(|| {
                err(
                    field,
                    format!("'{s}' is not a duration; write e.g. 15s, 5m or 1h30m"),
                )
            })
        }
    }
}

/// KES log levels (KES: `kesconf/config.go` `parseLogLevel`) as slog numbers: DEBUG -4, INFO 0, WARN 4, ERROR 8, `off` above all.
fn log_level(s: &str, field: &str) -> Result<i64, ConfigError> {
    let t = s.trim().to_ascii_uppercase();
    let bad = || {
        err(
            field,
            format!("'{s}' is not a log level; use on, off, DEBUG, INFO, WARN or ERROR"),
        )
    };
    if t.is_empty() || t == "ON" {
        return Ok(0);
    }
    if t == "OFF" {
        return Ok(9);
    }
    if let Ok(n) = t.parse::<i64>() {
        return Ok(n);
    }
    let (name, offset) = match t.split_once(['+', '-']) {
        Some((name, n)) => {
            let n: i64 = n.parse().map_err(|_| bad())?;
            (name, if t.contains('-') { -n } else { n })
        }
        None => (t.as_str(), 0),
    };
    let base = match name {
        "DEBUG" => -4,
        "INFO" => 0,
        "WARN" => 4,
        "ERROR" => 8,
        _ => return Err(bad()),
    };
    Ok(base + offset)
}

impl ServerConfig {
    /// Reads, substitutes and validates a config file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        // The text may hold the PIN inline.
        let text = zeroize::Zeroizing::new(
            std::fs::read_to_string(path)
                .map_err(|e| err("(file)", format!("cannot read '{}': {e}", path.display())))?,
        );
        Self::parse(&text)
    }

    /// Substitutes (from the process environment) and validates config text.
    pub fn parse(text: &str) -> Result<Self, ConfigError> {
        Self::parse_with(text, |name| std::env::var(name).ok())
    }

    /// [`ServerConfig::parse`] with an explicit variable lookup.
    pub fn parse_with(
        text: &str,
        lookup: impl Fn(&str) -> Option<String>,
    ) -> Result<Self, ConfigError> {
        let mut value = super::env::substitute_with(text, lookup)?;
        let cfg = Self::from_value(&value);
        super::env::wipe(&mut value);
        cfg
    }

    /// Validates a substituted document.
    pub fn from_value(doc: &Value) -> Result<Self, ConfigError> {
        let root = mapping(doc, "(file)")?;
        if let Some(v) = get(root, "version") {
            let v = scalar(v, "version")?;
            if v.trim() != "v1" {
                return Err(err(
                    "version",
                    format!("invalid server config version '{v}'; use v1"),
                ));
            }
        }

        let address = match opt_string(root, "address", "address")? {
            None => None,
            Some(a) => Some(parse_address(&a).ok_or_else(|| {
                err(
                    "address",
                    format!("'{a}' is not an <ip>:<port> address; e.g. 0.0.0.0:7373"),
                )
            })?),
        };

        let admin_map = get(root, "admin")
            .map(|v| mapping(v, "admin"))
            .transpose()?
            .flatten();
        let admin_text = opt_string(admin_map, "identity", "admin.identity")?.ok_or_else(|| {
            err(
                "admin.identity",
                "required; set an identity (or `disabled` to turn admin access off)",
            )
        })?;
        let admin = Identity::admin(&admin_text);
        if !admin.is_hash() {
            tracing::warn!(
                "admin.identity is not an identity (64 hex digits): admin access is disabled"
            );
        }

        let tls_map = get(root, "tls")
            .map(|v| mapping(v, "tls"))
            .transpose()?
            .flatten();
        let key = opt_string(tls_map, "key", "tls.key")?
            .ok_or_else(|| err("tls.key", "required: the server's private key PEM file"))?;
        let cert = opt_string(tls_map, "cert", "tls.cert")?
            .ok_or_else(|| err("tls.cert", "required: the server's certificate PEM file"))?;
        if opt_string(tls_map, "password", "tls.password")?.is_some() {
            return Err(err(
                "tls.password",
                "encrypted private keys are not supported; decrypt the key (e.g. `openssl pkey -in key.pem -out plain.pem`) and remove tls.password",
            ));
        }
        let verify_client_chain = match opt_string(tls_map, "auth", "tls.auth")? {
            None => false,
            Some(a) => match a.trim().to_ascii_lowercase().as_str() {
                "on" => true,
                "off" => false,
                other => return Err(err("tls.auth", format!("'{other}' is neither on nor off"))),
            },
        };
        let ca = opt_string(tls_map, "ca", "tls.ca")?.map(PathBuf::from);
        if verify_client_chain && ca.is_none() {
            return Err(err("tls.ca", "tls.auth is on: set tls.ca to the CA file or directory that issues client certificates"));
        }
        if get(tls_map, "proxy").is_some() {
            tracing::warn!("tls.proxy is ignored: the current KES server does not use it either");
        }
        let tls = TlsConfig {
            key: PathBuf::from(key),
            cert: PathBuf::from(cert),
            verify_client_chain,
            ca,
        };

        let mut policies = BTreeMap::new();
        if let Some(pm) = get(root, "policy")
            .map(|v| mapping(v, "policy"))
            .transpose()?
            .flatten()
        {
            for (k, v) in pm {
                let name_text = scalar(k, "policy")?;
                let field = format!("policy.{name_text}");
                let name = PolicyName::new(&name_text).map_err(|e| err(&field, e.to_string()))?;
                let m = mapping(v, &field)?;
                let allow = string_list(get(m, "allow"), &format!("{field}.allow"))?;
                let deny = string_list(get(m, "deny"), &format!("{field}.deny"))?;
                let identities = string_list(get(m, "identities"), &format!("{field}.identities"))?
                    .iter()
                    .map(|s| s.trim())
                    .filter(|s| !s.is_empty())
                    .map(|s| {
                        Identity::new(s)
                            .map_err(|e| err(format!("{field}.identities"), e.to_string()))
                    })
                    .collect::<Result<Vec<_>, _>>()?;
                policies.insert(
                    name,
                    PolicyEntry {
                        policy: Policy { allow, deny },
                        identities,
                    },
                );
            }
        }

        let cache_map = get(root, "cache")
            .map(|v| mapping(v, "cache"))
            .transpose()?
            .flatten();
        let expiry = get(cache_map, "expiry")
            .map(|v| mapping(v, "cache.expiry"))
            .transpose()?
            .flatten();
        let cache = CacheConfig {
            any: duration(expiry, "any", "cache.expiry.any")?.unwrap_or_default(),
            unused: duration(expiry, "unused", "cache.expiry.unused")?.unwrap_or_default(),
            offline: duration(expiry, "offline", "cache.expiry.offline")?.unwrap_or_default(),
        };

        let mut api = BTreeMap::new();
        if let Some(am) = get(root, "api")
            .map(|v| mapping(v, "api"))
            .transpose()?
            .flatten()
        {
            for (k, v) in am {
                let path = scalar(k, "api")?;
                let field = format!("api.{path}");
                let m = mapping(v, &field)?;
                let skip_auth = match get(m, "skip_auth") {
                    None => false,
                    Some(v) => parse_bool(&scalar(v, &field)?, &format!("{field}.skip_auth"))?,
                };
                let timeout = duration(m, "timeout", &format!("{field}.timeout"))?;
                api.insert(path, RouteOverride { skip_auth, timeout });
            }
        }

        let log_map = get(root, "log")
            .map(|v| mapping(v, "log"))
            .transpose()?
            .flatten();
        let error_level = log_level(
            &opt_string(log_map, "error", "log.error")?.unwrap_or_default(),
            "log.error",
        )?;
        let audit_level = log_level(
            &opt_string(log_map, "audit", "log.audit")?.unwrap_or_default(),
            "log.audit",
        )?;
        let log = LogConfig {
            error: error_level <= 8,
            audit: audit_level <= 0,
        };

        let mut keys = Vec::new();
        let mut rotate_after = BTreeMap::new();
        let mut seen = BTreeSet::new();
        match get(root, "keys") {
            None => {}
            Some(Value::Sequence(items)) => {
                for (i, item) in items.iter().enumerate() {
                    let field = format!("keys[{i}].name");
                    let m = mapping(item, &format!("keys[{i}]"))?;
                    let name =
                        opt_string(m, "name", &field)?.ok_or_else(|| err(&field, "required"))?;
                    let name = KeyName::new(name.trim())
                        .map_err(|e| err(&field, format!("key name {e}")))?;
                    if !seen.insert(name.clone()) {
                        return Err(err(&field, format!("key '{name}' is listed twice")));
                    }
                    let period_field = format!("keys[{i}].rotate_after");
                    if let Some(text) = opt_string(m, "rotate_after", &period_field)? {
                        let period = crate::config::parse_duration(&text)
                            .filter(|d| !d.is_zero())
                            .ok_or_else(|| {
                                err(
                                    &period_field,
                                    "expected a positive duration such as 2160h (90 days)",
                                )
                            })?;
                        rotate_after.insert(name.clone(), period);
                    }
                    keys.push(name);
                }
            }
            Some(_) => return Err(err("keys", "expected a list of `- name: <key>` entries")),
        }

        let keystore = KeystoreConfig::from_value(get(root, "keystore").ok_or_else(|| {
            err(
                "keystore",
                "no keystore specified; add `pkcs11:` or `soft:`",
            )
        })?)?;

        let cfg = ServerConfig {
            address,
            admin,
            tls,
            policies,
            cache,
            api,
            log,
            keys,
            rotate_after,
            keystore,
        };
        // Catch policy conflicts (one policy per identity, admin in no policy) at load time.
        cfg.authorizer(OffsetDateTime::now_utc())?;
        Ok(cfg)
    }

    /// The admin and policies as an authorization snapshot.
    pub fn authorizer(&self, created_at: OffsetDateTime) -> Result<Authorizer, ConfigError> {
        Authorizer::new(self.admin.clone(), self.policies.clone(), created_at)
            .map_err(|e| err("policy", e.to_string()))
    }
}

/// `ip:port`, `[v6]:port` or `:port` (all interfaces).
pub fn parse_address(s: &str) -> Option<SocketAddr> {
    let s = s.trim();
    if let Some(port) = s.strip_prefix(':') {
        return format!("0.0.0.0:{port}").parse().ok();
    }
    s.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    const ADMIN: &str = "3ecfcdf38fcbe141ae26a1030f81e96b753365a46760ae6b578698a97c59fd22";

    fn base() -> String {
        format!(
            "version: v1\naddress: 127.0.0.1:7373\nadmin:\n  identity: {ADMIN}\ntls:\n  key: k.pem\n  cert: c.pem\nkeystore:\n  soft: {{}}\n"
        )
    }

    #[test]
    fn parses_full_file() {
        let text = format!(
            "{}policy:\n  minio:\n    allow:\n    - /v1/key/generate/*\n    deny: [/v1/key/delete/*]\n    identities:\n    - {}\ncache:\n  expiry:\n    any: 5m0s\n    unused: \"30s\"\napi:\n  /v1/status:\n    skip_auth: \"true\"\n    timeout: 3s\nlog:\n  error: on\n  audit: off\nkeys:\n  - name: minio-key\n",
            base(),
            "a".repeat(64)
        );
        let cfg = ServerConfig::parse(&text).unwrap();
        assert_eq!(cfg.address.unwrap().port(), 7373);
        assert_eq!(cfg.admin.as_str(), ADMIN);
        let p = &cfg.policies[&PolicyName::new("minio").unwrap()];
        assert_eq!(p.policy.allow, vec!["/v1/key/generate/*"]);
        assert_eq!(p.policy.deny, vec!["/v1/key/delete/*"]);
        assert_eq!(cfg.cache.any, Duration::from_secs(300));
        assert_eq!(
            cfg.api["/v1/status"],
            RouteOverride {
                skip_auth: true,
                timeout: Some(Duration::from_secs(3))
            }
        );
        assert_eq!(
            cfg.log,
            LogConfig {
                error: true,
                audit: false
            }
        );
        assert_eq!(cfg.keys[0].as_str(), "minio-key");
    }

    #[test]
    fn rejects_bad_values() {
        let bad = |extra: &str| ServerConfig::parse(&format!("{}{extra}", base())).unwrap_err();
        assert_eq!(
            ServerConfig::parse(&base().replace("version: v1", "version: v2"))
                .unwrap_err()
                .field,
            "version"
        );
        assert_eq!(bad("keys:\n - name: a.b\n").field, "keys[0].name");
        assert_eq!(
            bad("keys:\n - name: a\n   rotate_after: soon\n").field,
            "keys[0].rotate_after"
        );
        assert_eq!(
            bad("keys:\n - name: a\n   rotate_after: 0s\n").field,
            "keys[0].rotate_after"
        );
        assert_eq!(bad("keys:\n - name: a\n - name: a\n").field, "keys[1].name");
        assert_eq!(
            bad("api:\n  /v1/status:\n    timeout: 10\n").field,
            "api./v1/status.timeout"
        );
        let dup = format!(
            "policy:\n  p1:\n    identities: [{0}]\n  p2:\n    identities: [{0}]\n",
            "b".repeat(64)
        );
        assert!(bad(&dup).message.contains("identity already has a policy"));
        let e =
            ServerConfig::parse(&base().replace("soft: {}", "fs:\n    path: /tmp/x")).unwrap_err();
        assert!(
            e.message.contains("pkcs11")
                && e.message.contains("soft")
                && e.message.contains("kesh migrate"),
            "{e}"
        );
        let e = ServerConfig::parse(&base().replace(&format!("admin:\n  identity: {ADMIN}\n"), ""))
            .unwrap_err();
        assert_eq!(e.field, "admin.identity");
    }

    #[test]
    fn env_substitution_reaches_typed_fields() {
        let text = "address: ${ADDR}\nadmin:\n  identity: ${ADMIN}\ntls:\n  key: k\n  cert: c\napi:\n  /v1/ready:\n    skip_auth: ${SKIP}\n    timeout: ${T}\nkeys:\n  - name: ${KEY}\nkeystore:\n  soft: {}\n";
        let vars = |name: &str| {
            Some(match name {
                "ADDR" => "127.0.0.1:9000".to_owned(),
                "ADMIN" => ADMIN.to_owned(),
                "SKIP" => "true".to_owned(),
                "T" => "20s".to_owned(),
                "KEY" => "from-env".to_owned(),
                _ => return None,
            })
        };
        let cfg = ServerConfig::parse_with(text, vars).unwrap();
        assert_eq!(cfg.address.unwrap().port(), 9000);
        assert_eq!(cfg.admin.as_str(), ADMIN);
        assert_eq!(
            cfg.api["/v1/ready"],
            RouteOverride {
                skip_auth: true,
                timeout: Some(Duration::from_secs(20))
            }
        );
        assert_eq!(cfg.keys[0].as_str(), "from-env");
        let missing = ServerConfig::parse_with(text, |_| None).unwrap_err();
        assert!(missing.message.contains("ADDR"), "{missing}");
    }

    #[test]
    fn any_admin_string_is_accepted_and_only_a_hash_enables_admin() {
        for text in ["disabled", "<disabled>", "not an identity.", "ADMIN"] {
            let yaml = base().replace(ADMIN, &format!("\"{text}\""));
            let cfg = ServerConfig::parse(&yaml).unwrap_or_else(|e| panic!("{text}: {e}"));
            assert_eq!(cfg.admin.as_str(), text);
            assert!(!cfg.admin.is_hash(), "{text}");
        }
        assert!(ServerConfig::parse(&base()).unwrap().admin.is_hash());
    }

    #[test]
    fn addresses() {
        assert_eq!(parse_address(":7373").unwrap().to_string(), "0.0.0.0:7373");
    }
}
